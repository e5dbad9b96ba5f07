package doctor

import (
	"bytes"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/internal/testlib/fakegce"
	"github.com/metaconceal/metaconceal/pkg/selftest"
)

func run(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	if !slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--state-dir") }) {
		args = append([]string{"--state-dir=" + t.TempDir()}, args...) // never the machine's own
	}
	code = Main(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestDoctorAgainstFakeUpstream(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		opts     []fakegce.Option
		set      map[string]string
		code     int
		contains []string
		absent   []string
	}{
		{
			name:     "default GKE scopes are safe",
			code:     ExitOK,
			contains: []string{"OK: no service account", "project:   fake-project", "scope: https://www.googleapis.com/auth/devstorage.read_only", "NOTE: 123456789012-compute@developer.gserviceaccount.com is the Compute Engine default"},
			absent:   []string{"WARNING", "gcloud"},
		},
		{
			name: "cloud-platform",
			opts: []fakegce.Option{fakegce.WithProjectID("acme-prod"), fakegce.WithClusterName("prod-1"), fakegce.WithZone("europe-west1-b"),
				fakegce.WithScopes("https://www.googleapis.com/auth/cloud-platform")},
			code: ExitWarnings,
			contains: []string{
				"WARNING: service account 123456789012-compute@developer.gserviceaccount.com has the scope https://www.googleapis.com/auth/cloud-platform.",
				"gcloud iam service-accounts create prod-1-node-sa \\\n    --project=acme-prod \\\n    --display-name=\"prod-1 node service account\"",
				"export NODE_SA_EMAIL=prod-1-node-sa@acme-prod.iam.gserviceaccount.com",
				"gcloud projects add-iam-policy-binding acme-prod \\\n    --member=serviceAccount:$NODE_SA_EMAIL \\\n    --role=roles/logging.logWriter",
				"--role=roles/monitoring.metricWriter", "--role=roles/monitoring.viewer",
				"gcloud beta container node-pools create metaconceal-secure-pool \\\n    --project=acme-prod \\\n    --cluster=prod-1 \\\n    --zone=europe-west1-b \\\n    --service-account=$NODE_SA_EMAIL \\\n    --workload-metadata-from-node=SECURE",
				"gcloud beta container clusters create prod-1",
				"compute.instances.get",
			},
			absent: []string{"OK:"},
		},
		{
			name:     "compute.readonly on a second account, regional cluster",
			opts:     []fakegce.Option{fakegce.WithServiceAccountEmail("node@p.iam.gserviceaccount.com")},
			set:      map[string]string{"instance/service-accounts/extra@p.iam.gserviceaccount.com/email": "extra@p.iam.gserviceaccount.com", "instance/service-accounts/extra@p.iam.gserviceaccount.com/scopes": "https://www.googleapis.com/auth/compute.readonly\nhttps://www.googleapis.com/auth/logging.write", "instance/attributes/cluster-location": "us-east4"},
			code:     ExitWarnings,
			contains: []string{"WARNING: service account extra@p.iam.gserviceaccount.com has the scope https://www.googleapis.com/auth/compute.readonly.", "--region=us-east4"},
			absent:   []string{"WARNING: service account node@", "NOTE:"},
		},
		{
			name:     "compute scope",
			opts:     []fakegce.Option{fakegce.WithScopes("https://www.googleapis.com/auth/compute", "https://www.googleapis.com/auth/cloud-platform.read-only")},
			code:     ExitWarnings,
			contains: []string{"has the scope https://www.googleapis.com/auth/compute.\n", "has the scope https://www.googleapis.com/auth/cloud-platform.read-only.\n"},
		},
		{
			name:     "look-alike scopes are not flagged",
			opts:     []fakegce.Option{fakegce.WithScopes("https://www.googleapis.com/auth/computeengine-not-a-scope", "https://example.com/auth/cloud-platform")},
			code:     ExitOK,
			contains: []string{"OK:"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fake := fakegce.New(tc.opts...)
			for k, v := range tc.set {
				fake.Set(k, v)
			}
			ts := httptest.NewServer(fake)
			t.Cleanup(ts.Close)
			code, out, errOut := run(t, "--upstream", ts.URL)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tc.code, out, errOut)
			}
			for _, s := range tc.contains {
				if !strings.Contains(out, s) {
					t.Errorf("output lacks %q:\n%s", s, out)
				}
			}
			for _, s := range tc.absent {
				if strings.Contains(out, s) {
					t.Errorf("output has %q:\n%s", s, out)
				}
			}
		})
	}
}

func TestDoctorSendsMetadataFlavor(t *testing.T) {
	t.Parallel()
	fake := fakegce.New()
	var without atomic.Int32
	fake.OnRequest(func(r *http.Request) {
		if r.Header.Get("Metadata-Flavor") != "Google" {
			without.Add(1)
		}
	})
	ts := httptest.NewServer(fake)
	t.Cleanup(ts.Close)
	if code, _, errOut := run(t, "--upstream", ts.URL+"/"); code != ExitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	if n := without.Load(); n != 0 {
		t.Errorf("%d requests without Metadata-Flavor: Google", n)
	}
}

func TestDoctorUnreachableOrWrong(t *testing.T) {
	t.Parallel()
	// A port that was just free: nothing listens there.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := "http://" + ln.Addr().String()
	ln.Close()

	notMetadata := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("hello"))
	}))
	t.Cleanup(notMetadata.Close)
	forbidden := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Metadata-Flavor", "Google")
		http.Error(w, "This metadata endpoint is concealed.", http.StatusForbidden)
	}))
	t.Cleanup(forbidden.Close)

	tests := []struct {
		name     string
		args     []string
		contains []string
	}{
		{"upstream down", []string{"--upstream", down, "--timeout", "2s"}, []string{"cannot read the node's metadata from " + down, "connection refused"}},
		{"not a metadata server", []string{"--upstream", notMetadata.URL}, []string{"not a GCE metadata server"}},
		{"error status", []string{"--upstream", forbidden.URL}, []string{"status 403", "concealed"}},
		{"bad upstream", []string{"--upstream", "169.254.169.254"}, []string{"--upstream"}},
		// An upstream on loopback that nothing serves: should validation ever move after
		// the first request, these still send nothing off this machine.
		{"bad timeout", []string{"--upstream", down, "--timeout", "0s"}, []string{"--timeout"}},
		{"stray argument", []string{"--upstream", down, "now"}, []string{"unexpected argument"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			code, out, errOut := run(t, tc.args...)
			if code != ExitUnreachable {
				t.Fatalf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", code, ExitUnreachable, out, errOut)
			}
			for _, s := range tc.contains {
				if !strings.Contains(errOut, s) {
					t.Errorf("stderr lacks %q:\n%s", s, errOut)
				}
			}
		})
	}
}

func TestSuggestSAName(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"prod-1":                              "prod-1-node-sa",
		"Prod_Cluster":                        "prod-cluster-node-sa",
		"a-very-long-cluster-name-indeed-yes": "a-very-long-cluster-na-node-sa",
		"9lives":                              "mc9lives-node-sa",
		"":                                    "mc-node-sa",
	} {
		got := suggestSAName(in)
		if got != want {
			t.Errorf("suggestSAName(%q) = %q, want %q", in, got, want)
		}
		if len(got) < 6 || len(got) > 30 {
			t.Errorf("suggestSAName(%q) = %q: length %d outside 6-30", in, got, len(got))
		}
	}
}

// TestDoctorGuardLine: the doctor prints the node agent's last self-test, and a
// bypassed guard is a warning (exit 1) even when the scopes are safe.
func TestDoctorGuardLine(t *testing.T) {
	t.Parallel()
	up := httptest.NewServer(fakegce.New())
	t.Cleanup(up.Close)
	at := time.Date(2026, 12, 5, 15, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		name    string
		outcome *selftest.Outcome
		code    int
		want    string
	}{
		{"none", nil, ExitOK, "guard self-test: none in"},
		{"effective", &selftest.Outcome{State: selftest.StateEffective, Pod: "team/web", Verdict: selftest.Effective, At: at}, ExitOK,
			"guard self-test at 2026-12-05T15:00:00Z: Effective: a raw-socket request from pod team/web to the metadata server reached the metaconceal proxy"},
		{"bypassed", &selftest.Outcome{State: selftest.StateBypassed, Pod: "team/web", Verdict: selftest.Bypassed, Status: "HTTP/1.1 404 Not Found", At: at}, ExitWarnings,
			"WARNING: guard self-test at 2026-12-05T15:00:00Z: BYPASSED: a raw-socket request from pod team/web"},
	} {
		dir := t.TempDir()
		if c.outcome != nil {
			if err := selftest.WriteOutcome(dir, *c.outcome); err != nil {
				t.Fatal(err)
			}
		}
		code, out, stderr := run(t, "--upstream", up.URL, "--state-dir", dir)
		if code != c.code || !strings.Contains(out, c.want) {
			t.Errorf("%s: exit %d, want %d; output lacks %q:\n%s%s", c.name, code, c.code, c.want, out, stderr)
		}
	}
}
