package scenario

import (
	"strings"
	"testing"
	"time"
)

func TestResultString(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		r    Result
		want string
	}{
		{Result{Name: "uninstall", Pass: true, Elapsed: 1500 * time.Millisecond, Detail: "all\ngone"}, "scenario uninstall PASS 1.5s all gone"},
		{Result{Name: "rolling-update", Elapsed: 12 * time.Second, Detail: "leaks=1  longest-gap=0.40s"}, "scenario rolling-update FAIL 12.0s leaks=1 longest-gap=0.40s"},
		{Result{Name: "x", Pass: true}, "scenario x PASS 0.0s -"},
	} {
		if got := tc.r.String(); got != tc.want {
			t.Errorf("String() = %q, want %q", got, tc.want)
		}
	}
}

func TestSelect(t *testing.T) {
	t.Parallel()
	list := List()
	all, err := Select(list, nil)
	if err != nil || len(all) != len(list) {
		t.Fatalf("Select(nil) = %d scenarios, %v; want all %d", len(all), err, len(list))
	}
	// List order is kept whatever the order asked.
	got, err := Select(list, []string{"uninstall", "deployment-concealed"})
	if err != nil || strings.Join(Names(got), ",") != "deployment-concealed,uninstall" {
		t.Fatalf("Select = %v, %v", Names(got), err)
	}
	if _, err := Select(list, []string{"nope"}); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("Select(unknown) err = %v, want one naming it", err)
	}
}

func TestListNamesAndUninstallLast(t *testing.T) {
	t.Parallel()
	names := Names(List())
	for _, want := range []string{"deployment-concealed", "hostnetwork-direct", "excluded-namespace-exposed", "rolling-update", "uninstall"} {
		found := false
		for _, n := range names {
			found = found || n == want
		}
		if !found {
			t.Errorf("scenario %q missing from %v", want, names)
		}
	}
	if names[len(names)-1] != "uninstall" {
		t.Errorf("last scenario %q, want uninstall (it removes metaconceal)", names[len(names)-1])
	}
}

func TestAnalyzeProbeLog(t *testing.T) {
	t.Parallel()
	concealed := `"status":403,"body":"This metadata endpoint is concealed.","leak":false`
	line := func(t int64, rest string) string { return `{"t":` + itoa(t) + `,` + rest + "}" }
	for _, tc := range []struct {
		name                   string
		log                    []string
		since                  int64
		requests, leaks, noAns int
		gap                    time.Duration
		lastConcealed          bool
	}{
		{
			name: "refused during restart",
			log: []string{
				line(900, concealed), // before the window
				line(1000, concealed),
				line(1100, `"status":0,"body":"","leak":false,"err":"connection refused"`),
				line(1200, `"status":0,"body":"","leak":false,"err":"connection refused"`),
				line(1700, concealed),
				line(1800, concealed),
			},
			since: 950, requests: 5, noAns: 2, gap: 700 * time.Millisecond, lastConcealed: true,
		},
		{
			name:  "a leak",
			log:   []string{line(1000, concealed), line(1100, `"status":200,"body":"KUBE_ENV","leak":true`)},
			since: 1000, requests: 2, leaks: 1, gap: 0,
		},
		{
			name:  "200 without marker still counts",
			log:   []string{line(1000, `"status":200,"body":"x","leak":false`)},
			since: 1000, requests: 1, leaks: 1,
		},
		{
			name:  "gap from window start",
			log:   []string{line(3000, concealed)},
			since: 1000, requests: 1, gap: 2 * time.Second, lastConcealed: true,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, err := analyzeProbeLog([]byte(strings.Join(tc.log, "\n")+"\n"), tc.since)
			if err != nil {
				t.Fatal(err)
			}
			if st.requests != tc.requests || st.leaks != tc.leaks || st.noAnswer != tc.noAns || st.longestGap != tc.gap || st.lastConcealed != tc.lastConcealed {
				t.Errorf("got %s lastConcealed=%v; want requests=%d leaks=%d no-answer=%d gap=%s lastConcealed=%v",
					st, st.lastConcealed, tc.requests, tc.leaks, tc.noAns, tc.gap, tc.lastConcealed)
			}
		})
	}
	if _, err := analyzeProbeLog([]byte("not json\n"), 0); err == nil {
		t.Error("a line that is not the probe's JSON must be an error")
	}
}

func itoa(n int64) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
		if n == 0 {
			return string(b[i:])
		}
	}
}

func TestHasAuditLine(t *testing.T) {
	t.Parallel()
	logs := `{"level":"INFO","msg":"serving"}
{"level":"WARN","msg":"metadata request blocked","verdict":"conceal","rule":"kube-env","pod_namespace":"ns","pod_name":"web-1"}
{"level":"WARN","msg":"metadata request blocked","verdict":"deny","rule":"recursive","pod_namespace":"ns","pod_name":"web-2"}`
	for _, tc := range []struct {
		ns, pod, rule string
		want          bool
	}{
		{"ns", "web-1", "kube-env", true},
		{"ns", "web-2", "kube-env", false},
		{"other", "web-1", "kube-env", false},
		{"ns", "web-1", "identity", false},
	} {
		if got := hasAuditLine(logs, tc.ns, tc.pod, tc.rule); got != tc.want {
			t.Errorf("hasAuditLine(%s/%s %s) = %v, want %v", tc.ns, tc.pod, tc.rule, got, tc.want)
		}
	}
}

func TestEntryOf(t *testing.T) {
	t.Parallel()
	with := []byte(`{"name":"n","plugins":[{"type":"bridge"},{"type":"metaconceal","mode":"SECURE"}]}`)
	without := []byte(`{"name":"n","plugins":[{"type":"bridge"}]}`)
	if e, err := entryOf(with); err != nil || e == nil || e["mode"] != "SECURE" {
		t.Errorf("entryOf(with) = %v, %v", e, err)
	}
	if e, err := entryOf(without); err != nil || e != nil {
		t.Errorf("entryOf(without) = %v, %v; want nil", e, err)
	}
	if _, err := entryOf([]byte("{")); err == nil {
		t.Error("entryOf(bad JSON) must fail")
	}
}
