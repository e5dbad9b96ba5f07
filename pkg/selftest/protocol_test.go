package selftest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/metaconceal/metaconceal/pkg/state"
)

func TestNonce(t *testing.T) {
	t.Parallel()
	a, err := NewNonce()
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewNonce()
	if err != nil {
		t.Fatal(err)
	}
	if a == b || !ValidNonce(a) || !ValidNonce(b) {
		t.Fatalf("nonces %q %q: want two distinct valid ones", a, b)
	}
	for _, bad := range []string{"", "abc", strings.Repeat("A", 32), strings.Repeat("g", 32), strings.Repeat("a", 33), "../" + strings.Repeat("a", 29)} {
		if ValidNonce(bad) {
			t.Errorf("ValidNonce(%q) = true", bad)
		}
	}
	req := string(Request(a))
	if !strings.HasPrefix(req, "GET "+PathPrefix+a+" HTTP/1.1\r\n") || !strings.HasSuffix(req, "\r\n\r\n") {
		t.Errorf("request %q", req)
	}
}

func TestClassify(t *testing.T) {
	t.Parallel()
	const nonce = "0123456789abcdef0123456789abcdef"
	cases := []struct {
		name, raw string
		want      Verdict
		status    string
		ok        bool
	}{
		{"proxy", "HTTP/1.1 200 OK\r\nMetaconceal-Selftest: " + nonce + "\r\nContent-Length: 28\r\n\r\nmetaconceal", Effective, "HTTP/1.1 200 OK", true},
		{"header name in lower case", "HTTP/1.1 200 OK\r\nmetaconceal-selftest:" + nonce + "\r\n\r\n", Effective, "HTTP/1.1 200 OK", true},
		{"metadata server 404", "HTTP/1.1 404 Not Found\r\nMetadata-Flavor: Google\r\nServer: Metadata Server for VM\r\n\r\n", Bypassed, "HTTP/1.1 404 Not Found", true},
		{"another nonce echoed", "HTTP/1.1 200 OK\r\nMetaconceal-Selftest: ffffffffffffffffffffffffffffffff\r\n\r\n", Bypassed, "HTTP/1.1 200 OK", true},
		{"nonce only in the body", "HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\nMetaconceal-Selftest: " + nonce, Bypassed, "HTTP/1.1 200 OK", true},
		{"head incomplete", "HTTP/1.1 200 OK\r\nMetaconceal-Selftest: " + nonce, "", "", false},
		{"not HTTP", "SSH-2.0-OpenSSH\r\n\r\n", "", "", false},
		{"nothing", "", "", "", false},
	}
	for _, c := range cases {
		v, status, ok := classify([]byte(c.raw), nonce)
		if v != c.want || status != c.status || ok != c.ok {
			t.Errorf("%s: classify = %q %q %v; want %q %q %v", c.name, v, status, ok, c.want, c.status, c.ok)
		}
	}
	if !enough([]byte("HTTP/1.1 200 OK\r\n\r\n")) || enough([]byte("HTTP/1.1 200 OK\r\n")) || !enough(make([]byte, maxHead+1)) {
		t.Error("enough: want true at the end of the head or past maxHead only")
	}
	for v, guarded := range map[Verdict]bool{Effective: true, Blocked: true, Bypassed: false} {
		if v.Guarded() != guarded {
			t.Errorf("%s.Guarded() = %v", v, !guarded)
		}
	}
}

func TestCandidates(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	live := filepath.Join(dir, "netns-live")
	if err := os.WriteFile(live, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	rec := func(id, netns, ip, exposed string) state.Record {
		return state.Record{ContainerID: id, IfName: "eth0", Netns: netns, IPs: []string{ip}, Exposed: exposed != "", PodNamespace: "ns", PodName: id}
	}
	got := Candidates([]state.Record{
		rec("c", live, "10.0.0.3", ""),
		rec("a", live, "10.0.0.1", ""),
		rec("exposed", live, "10.0.0.2", "excludeNamespaces"),
		rec("gone", filepath.Join(dir, "netns-gone"), "10.0.0.4", ""),
		rec("v6", live, "fd00::1", ""),
		{ContainerID: "nonetns", IfName: "eth0", IPs: []string{"10.0.0.5"}},
	})
	var names []string
	for _, r := range got {
		names = append(names, PodName(r))
	}
	if strings.Join(names, ",") != "ns/a,ns/c" {
		t.Errorf("candidates %v; want ns/a,ns/c (concealed, IPv4, netns present, by key)", names)
	}
}

func TestOutcomeFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if _, ok, err := ReadOutcome(dir); ok || err != nil {
		t.Fatalf("empty dir: ok %v err %v", ok, err)
	}
	o := Outcome{State: StateBypassed, Pod: "team/web", Verdict: Bypassed, Status: "HTTP/1.1 404 Not Found", At: time.Unix(1800000000, 0).UTC(), Took: 40 * time.Millisecond}
	if err := WriteOutcome(dir, o); err != nil {
		t.Fatal(err)
	}
	got, ok, err := ReadOutcome(dir)
	if err != nil || !ok || got != o {
		t.Fatalf("ReadOutcome = %+v %v %v; want %+v", got, ok, err, o)
	}
	// The outcome file is not a state record.
	if recs, err := state.List(dir); err != nil || len(recs) != 0 {
		t.Errorf("state.List sees %v, %v", recs, err)
	}
}
