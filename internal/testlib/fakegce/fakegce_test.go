package fakegce

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// noRedirect is a client that reports 301s instead of following them.
var noRedirect = &http.Client{
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	Timeout:       30 * time.Second,
}

type answer struct {
	status int
	header http.Header
	body   string
}

func get(t *testing.T, base, target string, header map[string]string) answer {
	t.Helper()
	return getCtx(t, context.Background(), base, target, header)
}

func getCtx(t *testing.T, ctx context.Context, base, target string, header map[string]string) answer {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+target, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := noRedirect.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", target, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: reading body: %v", target, err)
	}
	return answer{resp.StatusCode, resp.Header, string(body)}
}

var flavor = map[string]string{"Metadata-Flavor": "Google"}

const v1 = "/computeMetadata/v1/"

func TestRequests(t *testing.T) {
	t.Parallel()
	fake := New(WithProjectID("proj-x"), WithNumericProjectID("555"), WithServiceAccountEmail("node@proj-x.iam.gserviceaccount.com"))
	ts := httptest.NewServer(fake)
	t.Cleanup(ts.Close)

	tests := []struct {
		name     string
		target   string
		header   map[string]string
		status   int
		body     string // exact body when not empty
		contains []string
		absent   []string
		location string
	}{
		{name: "root discovery without header", target: "/", status: 200, body: "0.1/\ncomputeMetadata/\n"},
		{name: "computeMetadata discovery without header", target: "/computeMetadata/", status: 200, body: "v1/\nv1beta1/\n"},
		{name: "computeMetadata without slash", target: "/computeMetadata", status: 301, location: "/computeMetadata/"},
		{name: "v1 without header", target: v1 + "project/project-id", status: 403, contains: []string{"Metadata-Flavor"}},
		{name: "v1 with wrong header value", target: v1 + "project/project-id", header: map[string]string{"Metadata-Flavor": "Amazon"}, status: 403},
		{name: "legacy request header accepted", target: v1 + "project/project-id", header: map[string]string{"X-Google-Metadata-Request": "True"}, status: 200, body: "proj-x"},
		{name: "project id", target: v1 + "project/project-id", header: flavor, status: 200, body: "proj-x"},
		{name: "numeric project id", target: v1 + "project/numeric-project-id", header: flavor, status: 200, body: "555"},
		{name: "v1 root listing", target: v1, header: flavor, status: 200, body: "instance/\nproject/\n"},
		{name: "v1 without slash", target: "/computeMetadata/v1", header: flavor, status: 301, location: "/computeMetadata/v1/"},
		{name: "directory without slash keeps query", target: v1 + "instance/attributes?recursive=true", header: flavor, status: 301, location: v1 + "instance/attributes/?recursive=true"},
		{name: "attributes listing", target: v1 + "instance/attributes/", header: flavor, status: 200, contains: []string{"cluster-name\n", "kube-env\n", "kube-labels\n"}},
		{name: "instance listing has subdirs with slash", target: v1 + "instance/", header: flavor, status: 200, contains: []string{"attributes/\n", "service-accounts/\n", "network-interfaces/\n", "zone\n"}},
		{name: "kube-env", target: v1 + "instance/attributes/kube-env", header: flavor, status: 200, contains: []string{KubeEnvMarker, "KUBELET_KEY: ", "\n"}},
		{name: "kube-env percent-encoded", target: "/computeMetadata/v1/instance/attributes/kube%2Denv", header: flavor, status: 200, contains: []string{KubeEnvMarker}},
		{name: "kube-env encoded slash", target: "/computeMetadata/v1/instance%2Fattributes%2Fkube-env", header: flavor, status: 200, contains: []string{KubeEnvMarker}},
		{name: "kube-env dot segments", target: "/computeMetadata/v1/instance/./attributes/../attributes/kube-env", header: flavor, status: 200, contains: []string{KubeEnvMarker}},
		{name: "kube-env double slash", target: "/computeMetadata/v1//instance//attributes//kube-env", header: flavor, status: 200, contains: []string{KubeEnvMarker}},
		{name: "kube-env trailing slash", target: v1 + "instance/attributes/kube-env/", header: flavor, status: 200, contains: []string{KubeEnvMarker}},
		{name: "kube-env other case", target: "/computeMetadata/V1/instance/attributes/KUBE-ENV", header: flavor, status: 200, contains: []string{KubeEnvMarker}},
		{name: "kube-env json", target: v1 + "instance/attributes/kube-env?alt=json", header: flavor, status: 200, contains: []string{`"ALLOCATE_NODE_CIDRS: \"true\"\n`, KubeEnvMarker}},
		{name: "recursive attributes carry kube-env under its own key", target: v1 + "instance/attributes/?recursive=true", header: flavor, status: 200, contains: []string{`"kube-env":"`, `"cluster-name":"`, KubeEnvMarker}},
		{name: "recursive instance camelCase", target: v1 + "instance/?recursive=true", header: flavor, status: 200, contains: []string{`"machineType":"projects/555/machineTypes/`, `"networkInterfaces":[{`, `"serviceAccounts":{`, `"kube-env":`, KubeEnvMarker}, absent: []string{IdentityTokenMarker, "access_token"}},
		{name: "recursive alt=text", target: v1 + "instance/?recursive=true&alt=text", header: flavor, status: 200, contains: []string{"attributes/cluster-name fake-cluster\n", "attributes/kube-env METACONCEAL_FAKE_SECRET: " + KubeEnvMarker + "\n", "zone projects/555/zones/us-central1-a\n"}},
		{name: "recursive project", target: v1 + "project/?recursive=true", header: flavor, status: 200, body: `{"attributes":{"enable-oslogin":"FALSE","google-compute-default-region":"us-central1"},"numericProjectId":555,"projectId":"proj-x"}`},
		{name: "directory alt=json", target: v1 + "project/?alt=json", header: flavor, status: 200, body: `["attributes/","numeric-project-id","project-id"]`},
		{name: "bad alt", target: v1 + "project/project-id?alt=xml", header: flavor, status: 400},
		{name: "service account email by default", target: v1 + "instance/service-accounts/default/email", header: flavor, status: 200, body: "node@proj-x.iam.gserviceaccount.com"},
		{name: "service account by email", target: v1 + "instance/service-accounts/node@proj-x.iam.gserviceaccount.com/aliases", header: flavor, status: 200, body: "default"},
		{name: "service accounts listing", target: v1 + "instance/service-accounts/", header: flavor, status: 200, body: "default/\nnode@proj-x.iam.gserviceaccount.com/\n"},
		{name: "service account listing", target: v1 + "instance/service-accounts/default/", header: flavor, status: 200, body: "aliases\nemail\nidentity\nscopes\ntoken\n"},
		{name: "scopes one per line", target: v1 + "instance/service-accounts/default/scopes", header: flavor, status: 200, body: strings.Join(DefaultScopes, "\n")},
		{name: "recursive service account", target: v1 + "instance/service-accounts/default/?recursive=true", header: flavor, status: 200, body: `{"aliases":["default"],"email":"node@proj-x.iam.gserviceaccount.com","scopes":["` + strings.Join(DefaultScopes, `","`) + `"]}`},
		{name: "token", target: v1 + "instance/service-accounts/default/token", header: flavor, status: 200, contains: []string{`"access_token":"ya29.fake-`, `"expires_in":3599`, `"token_type":"Bearer"`}},
		{name: "token alt=text", target: v1 + "instance/service-accounts/default/token?alt=text", header: flavor, status: 200, contains: []string{"access_token ya29.fake-", "token_type Bearer"}},
		{name: "identity without audience", target: v1 + "instance/service-accounts/default/identity", header: flavor, status: 400, contains: []string{"audience"}, absent: []string{IdentityTokenMarker}},
		{name: "identity", target: v1 + "instance/service-accounts/default/identity?audience=https://example.com", header: flavor, status: 200, contains: []string{IdentityTokenMarker}},
		{name: "identity full with licenses", target: v1 + "instance/service-accounts/default/identity?audience=x&format=full&licenses=TRUE", header: flavor, status: 200, contains: []string{IdentityTokenMarker}},
		{name: "identity by email", target: v1 + "instance/service-accounts/node@proj-x.iam.gserviceaccount.com/identity?audience=x", header: flavor, status: 200, contains: []string{IdentityTokenMarker}},
		{name: "x-forwarded-for on v1", target: v1 + "project/project-id", header: map[string]string{"Metadata-Flavor": "Google", "X-Forwarded-For": "10.0.0.1"}, status: 403, absent: []string{"proj-x"}},
		{name: "x-forwarded-for on root", target: "/", header: map[string]string{"X-Forwarded-For": ""}, status: 403},
		{name: "x-forwarded-for on legacy", target: "/0.1/meta-data/attributes/kube-env", header: map[string]string{"X-Forwarded-For": "1.2.3.4"}, status: 403, absent: []string{KubeEnvMarker}},
		{name: "legacy 0.1 root", target: "/0.1/", status: 200, body: "meta-data/\n"},
		{name: "legacy 0.1 attributes kube-env without header", target: "/0.1/meta-data/attributes/kube-env", status: 200, contains: []string{KubeEnvMarker}},
		{name: "legacy 0.1 instance kube-env without header", target: "/0.1/meta-data/instance/attributes/kube-env", status: 200, contains: []string{KubeEnvMarker}},
		{name: "legacy 0.1 project id", target: "/0.1/meta-data/project/project-id", status: 200, body: "proj-x"},
		{name: "v1beta1 kube-env without header", target: "/computeMetadata/v1beta1/instance/attributes/kube-env", status: 200, contains: []string{KubeEnvMarker}},
		{name: "v1beta1 recursive without header", target: "/computeMetadata/v1beta1/instance/attributes/?recursive=true", status: 200, contains: []string{KubeEnvMarker}},
		{name: "unknown version", target: "/computeMetadata/v2/project/project-id", header: flavor, status: 404},
		{name: "unknown path", target: v1 + "instance/nope", header: flavor, status: 404},
		{name: "unknown top", target: "/latest/meta-data/", status: 404},
		{name: "value below a value", target: v1 + "project/project-id/x", header: flavor, status: 404},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			a := get(t, ts.URL, tc.target, tc.header)
			if a.status != tc.status {
				t.Fatalf("GET %s: status %d, want %d; body %q", tc.target, a.status, tc.status, a.body)
			}
			if got := a.header.Get("Metadata-Flavor"); got != "Google" {
				t.Errorf("GET %s: Metadata-Flavor response header %q, want Google", tc.target, got)
			}
			if tc.body != "" && a.body != tc.body {
				t.Errorf("GET %s: body\n%q\nwant\n%q", tc.target, a.body, tc.body)
			}
			for _, s := range tc.contains {
				if !strings.Contains(a.body, s) {
					t.Errorf("GET %s: body lacks %q:\n%s", tc.target, s, a.body)
				}
			}
			for _, s := range tc.absent {
				if strings.Contains(a.body, s) {
					t.Errorf("GET %s: body has %q:\n%s", tc.target, s, a.body)
				}
			}
			if tc.location != "" && a.header.Get("Location") != tc.location {
				t.Errorf("GET %s: Location %q, want %q", tc.target, a.header.Get("Location"), tc.location)
			}
			if a.status == 200 && a.header.Get("ETag") == "" {
				t.Errorf("GET %s: no ETag", tc.target)
			}
		})
	}
}

// TestMarkersOnlyWhereExpected checks the markers' promise: KubeEnvMarker only in
// kube-env content, IdentityTokenMarker only in identity tokens.
func TestMarkersOnlyWhereExpected(t *testing.T) {
	t.Parallel()
	ts := httptest.NewServer(New())
	t.Cleanup(ts.Close)
	for _, target := range []string{
		v1 + "instance/attributes/cluster-name", v1 + "instance/attributes/kube-labels",
		v1 + "project/?recursive=true", v1 + "instance/service-accounts/?recursive=true",
		v1 + "instance/service-accounts/default/token", v1 + "instance/hostname",
	} {
		a := get(t, ts.URL, target, flavor)
		if a.status != 200 {
			t.Fatalf("GET %s: status %d", target, a.status)
		}
		if strings.Contains(a.body, KubeEnvMarker) || strings.Contains(a.body, IdentityTokenMarker) {
			t.Errorf("GET %s: carries a marker: %s", target, a.body)
		}
	}
	a := get(t, ts.URL, v1+"instance/service-accounts/default/identity?audience=a&format=full", flavor)
	if strings.Contains(a.body, KubeEnvMarker) {
		t.Errorf("identity token carries the kube-env marker")
	}
	parts := strings.Split(a.body, ".")
	if len(parts) != 3 {
		t.Fatalf("identity token has %d parts, want 3: %q", len(parts), a.body)
	}
	for i, p := range parts {
		if _, err := base64.RawURLEncoding.DecodeString(p); err != nil && i < 2 {
			t.Errorf("identity token part %d is not base64url: %v", i, err)
		}
		if strings.Trim(p, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") != "" {
			t.Errorf("identity token part %d has non-base64url characters: %q", i, p)
		}
	}
	claims, _ := base64.RawURLEncoding.DecodeString(parts[1])
	var c struct {
		Aud    string `json:"aud"`
		Google struct {
			ComputeEngine struct {
				ProjectID string `json:"project_id"`
			} `json:"compute_engine"`
		} `json:"google"`
	}
	if err := json.Unmarshal(claims, &c); err != nil {
		t.Fatalf("identity claims: %v", err)
	}
	if c.Aud != "a" || c.Google.ComputeEngine.ProjectID != "fake-project" {
		t.Errorf("identity claims = %+v, want aud a and project fake-project (format=full)", c)
	}
}

func TestHeadAndMethods(t *testing.T) {
	t.Parallel()
	ts := httptest.NewServer(New())
	t.Cleanup(ts.Close)
	req, _ := http.NewRequest(http.MethodHead, ts.URL+v1+"project/project-id", nil)
	req.Header.Set("Metadata-Flavor", "Google")
	resp, err := noRedirect.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("ETag") == "" {
		t.Errorf("HEAD: status %d etag %q, want 200 with an ETag", resp.StatusCode, resp.Header.Get("ETag"))
	}
	req, _ = http.NewRequest(http.MethodPost, ts.URL+v1+"project/project-id", nil)
	req.Header.Set("Metadata-Flavor", "Google")
	resp, err = noRedirect.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST: status %d, want 405", resp.StatusCode)
	}
}

func TestSetChangesValueAndEtags(t *testing.T) {
	t.Parallel()
	fake := New()
	ts := httptest.NewServer(fake)
	t.Cleanup(ts.Close)
	before := map[string]string{}
	paths := []string{"instance/attributes/kube-labels", "instance/attributes/", "instance/", "", "project/"}
	for _, p := range paths {
		before[p] = get(t, ts.URL, v1+p, flavor).header.Get("ETag")
	}
	fake.Set("instance/attributes/kube-labels", "a=b")
	if got := get(t, ts.URL, v1+"instance/attributes/kube-labels", flavor).body; got != "a=b" {
		t.Errorf("after Set: %q, want a=b", got)
	}
	for _, p := range paths {
		after := get(t, ts.URL, v1+p, flavor).header.Get("ETag")
		changed := after != before[p]
		if want := p != "project/"; changed != want {
			t.Errorf("%q: ETag %s -> %s; changed=%v, want %v", p, before[p], after, changed, want)
		}
	}
	// New values and directories appear in listings.
	fake.Set("instance/attributes/new-key", "v")
	fake.Set("instance/guest-attributes/x/y", "z")
	if a := get(t, ts.URL, v1+"instance/attributes/", flavor); !strings.Contains(a.body, "new-key\n") {
		t.Errorf("listing after Set lacks new-key: %q", a.body)
	}
	if a := get(t, ts.URL, v1+"instance/guest-attributes/x/y", flavor); a.body != "z" {
		t.Errorf("created value: %q, want z", a.body)
	}
	// default/ and <email>/ are one account.
	fake.Set("instance/service-accounts/default/scopes", "https://www.googleapis.com/auth/cloud-platform")
	email := get(t, ts.URL, v1+"instance/service-accounts/default/email", flavor).body
	if a := get(t, ts.URL, v1+"instance/service-accounts/"+email+"/scopes", flavor); a.body != "https://www.googleapis.com/auth/cloud-platform" {
		t.Errorf("scopes through the email after Set on default: %q", a.body)
	}
}

func TestSetPanicsOnMisuse(t *testing.T) {
	t.Parallel()
	fake := New()
	for _, p := range []string{"", "instance/attributes", "project/project-id/x"} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("Set(%q) did not panic", p)
				}
			}()
			fake.Set(p, "v")
		}()
	}
}

func TestWithScopesAndKubeEnv(t *testing.T) {
	t.Parallel()
	ts := httptest.NewServer(New(WithScopes("https://www.googleapis.com/auth/cloud-platform", "https://www.googleapis.com/auth/compute"), WithKubeEnv("X: y\n")))
	t.Cleanup(ts.Close)
	if a := get(t, ts.URL, v1+"instance/service-accounts/default/scopes", flavor); a.body != "https://www.googleapis.com/auth/cloud-platform\nhttps://www.googleapis.com/auth/compute" {
		t.Errorf("scopes: %q", a.body)
	}
	if a := get(t, ts.URL, v1+"instance/attributes/kube-env", flavor); a.body != "X: y\n" {
		t.Errorf("kube-env: %q", a.body)
	}
}

func TestLongPoll(t *testing.T) {
	t.Parallel()
	fake := New()
	ts := httptest.NewServer(fake)
	t.Cleanup(ts.Close)
	const p = v1 + "instance/attributes/kube-labels"
	first := get(t, ts.URL, p, flavor)
	etag := first.header.Get("ETag")

	t.Run("stale etag returns at once", func(t *testing.T) {
		t.Parallel()
		a := get(t, ts.URL, p+"?wait_for_change=true&last_etag=0000&timeout_sec=60", flavor)
		if a.status != 200 || a.body == "" {
			t.Fatalf("status %d body %q", a.status, a.body)
		}
	})
	t.Run("current etag times out with current value", func(t *testing.T) {
		t.Parallel()
		start := time.Now()
		a := get(t, ts.URL, v1+"project/project-id?wait_for_change=true&timeout_sec=1&last_etag="+get(t, ts.URL, v1+"project/project-id", flavor).header.Get("ETag"), flavor)
		if a.status != 200 || a.body != "fake-project" {
			t.Fatalf("status %d body %q", a.status, a.body)
		}
		if time.Since(start) < 900*time.Millisecond {
			t.Errorf("returned after %v, before its 1 s timeout", time.Since(start))
		}
	})
	t.Run("timeout_sec=0 answers at once", func(t *testing.T) {
		t.Parallel()
		a := get(t, ts.URL, v1+"instance/tags?wait_for_change=true&timeout_sec=0", flavor)
		if a.status != 200 || !strings.Contains(a.body, "gke-") {
			t.Fatalf("status %d body %q", a.status, a.body)
		}
	})
	t.Run("Set wakes value and directory waiters", func(t *testing.T) {
		t.Parallel()
		dirEtag := get(t, ts.URL, v1+"instance/attributes/", flavor).header.Get("ETag")
		results := make(chan answer, 2)
		go func() {
			results <- get(t, ts.URL, p+"?wait_for_change=true&timeout_sec=60&last_etag="+etag, flavor)
		}()
		go func() {
			results <- get(t, ts.URL, v1+"instance/attributes/?recursive=true&wait_for_change=true&timeout_sec=60&last_etag="+dirEtag, flavor)
		}()
		time.Sleep(200 * time.Millisecond) // let both requests start waiting
		fake.Set("instance/attributes/kube-labels", "changed=yes")
		for range 2 {
			select {
			case a := <-results:
				if !strings.Contains(a.body, "changed=yes") {
					t.Errorf("woken poll body %q lacks the new value", a.body)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("long poll not woken by Set")
			}
		}
	})
	t.Run("client cancel ends the wait", func(t *testing.T) {
		t.Parallel()
		var started atomic.Int32
		fake2 := New()
		fake2.OnRequest(func(*http.Request) { started.Add(1) })
		ts2 := httptest.NewServer(fake2)
		t.Cleanup(ts2.Close)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ts2.URL+v1+"project/project-id?wait_for_change=true", nil)
			req.Header.Set("Metadata-Flavor", "Google")
			resp, err := http.DefaultClient.Do(req)
			if err == nil {
				resp.Body.Close()
			}
			done <- err
		}()
		for fake2.Waiting() == 0 {
			time.Sleep(10 * time.Millisecond)
		}
		if started.Load() != 1 {
			t.Errorf("OnRequest saw %d requests, want 1", started.Load())
		}
		cancel()
		deadline := time.Now().Add(10 * time.Second)
		for fake2.Waiting() != 0 && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if n := fake2.Waiting(); n != 0 {
			t.Errorf("Waiting() = %d after the client cancelled, want 0", n)
		}
		select {
		case err := <-done:
			if err == nil {
				t.Error("cancelled poll returned a response")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("cancelled poll still waiting")
		}
		// httptest.Server.Close waits for handlers: it returns only if the handler's
		// wait ended when the client went away.
		closed := make(chan struct{})
		go func() { ts2.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(10 * time.Second):
			t.Fatal("handler still waiting after its client cancelled")
		}
	})
}

func TestManyConcurrentLongPolls(t *testing.T) {
	t.Parallel()
	fake := New()
	var seen atomic.Int32
	fake.OnRequest(func(*http.Request) { seen.Add(1) })
	ts := httptest.NewServer(fake)
	t.Cleanup(ts.Close)
	const polls = 300
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: polls, MaxConnsPerHost: 0}}
	etag := get(t, ts.URL, v1+"instance/attributes/cluster-name", flavor).header.Get("ETag")
	seen.Store(0)
	var wg sync.WaitGroup
	var bad atomic.Int32
	for range polls {
		wg.Go(func() {
			req, _ := http.NewRequest(http.MethodGet, ts.URL+v1+"instance/attributes/cluster-name?wait_for_change=true&timeout_sec=60&last_etag="+etag, nil)
			req.Header.Set("Metadata-Flavor", "Google")
			resp, err := client.Do(req)
			if err != nil {
				bad.Add(1)
				return
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(body) != "renamed" {
				bad.Add(1)
			}
		})
	}
	deadline := time.Now().Add(20 * time.Second)
	for fake.Waiting() < polls && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := fake.Waiting(); n != polls {
		t.Errorf("Waiting() = %d, want %d held polls", n, polls)
	}
	if n := seen.Load(); n != polls {
		t.Errorf("OnRequest saw %d requests, want %d", n, polls)
	}
	fake.Set("instance/attributes/cluster-name", "renamed")
	wg.Wait()
	if n := fake.Waiting(); n != 0 {
		t.Errorf("Waiting() = %d after the change, want 0", n)
	}
	if n := bad.Load(); n != 0 {
		t.Errorf("%d of %d polls failed or did not see the change", n, polls)
	}
}

func TestConcurrentSetAndGet(t *testing.T) {
	t.Parallel()
	fake := New()
	ts := httptest.NewServer(fake)
	t.Cleanup(ts.Close)
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			for j := range 50 {
				fake.Set("instance/attributes/k"+string(rune('a'+i)), strings.Repeat("x", j))
			}
		})
		wg.Go(func() {
			for range 50 {
				if a := get(t, ts.URL, v1+"instance/?recursive=true", flavor); a.status != 200 {
					t.Errorf("status %d", a.status)
					return
				}
			}
		})
	}
	wg.Go(func() {
		for range 50 {
			fake.OnRequest(func(*http.Request) {})
		}
	})
	wg.Wait()
}

// TestKubernetesCheckEndpoints: the endpoints Kubernetes' metadata-concealment e2e
// check expects to succeed through a concealing proxy answer 200 from the fake too
// (following redirects, as that check's client does), and 403 with X-Forwarded-For.
func TestKubernetesCheckEndpoints(t *testing.T) {
	t.Parallel()
	ts := httptest.NewServer(New())
	t.Cleanup(ts.Close)
	client := &http.Client{Timeout: 10 * time.Second}
	for _, p := range []string{
		"", "/", "/computeMetadata", "/computeMetadata/v1", "/computeMetadata/v1/",
		"/computeMetadata/v1/instance/service-accounts/default/token",
		"/computeMetadata/v1/instance/service-accounts/default/?recursive=true",
		"/computeMetadata/v1/instance/tags?alt=text",
		"/computeMetadata/v1/instance/tags?wait_for_change=false",
		"/computeMetadata/v1/instance/tags?wait_for_change=true&timeout_sec=0",
		"/computeMetadata/v1/instance/tags?wait_for_change=true&last_etag=d34db33f",
	} {
		for _, xff := range []bool{false, true} {
			req, _ := http.NewRequest(http.MethodGet, ts.URL+p, nil)
			req.Header.Set("Metadata-Flavor", "Google")
			want := http.StatusOK
			if xff {
				req.Header.Set("X-Forwarded-For", "Somebody-somewhere")
				want = http.StatusForbidden
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("GET %q: %v", p, err)
			}
			resp.Body.Close()
			if resp.StatusCode != want {
				t.Errorf("GET %q (X-Forwarded-For %v): status %d, want %d", p, xff, resp.StatusCode, want)
			}
		}
	}
}
