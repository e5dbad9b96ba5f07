package nodegate

import (
	"encoding/json"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

func TestWithTaint(t *testing.T) {
	t.Parallel()
	other := corev1.Taint{Key: "node.kubernetes.io/not-ready", Effect: corev1.TaintEffectNoSchedule}
	otherEffect := corev1.Taint{Key: TaintKey, Effect: corev1.TaintEffectNoExecute} // not ours: another effect
	cases := []struct {
		name   string
		in     []corev1.Taint
		want   bool
		out    []corev1.Taint
		change bool
	}{
		{"add to none", nil, true, []corev1.Taint{Taint}, true},
		{"add keeps others first", []corev1.Taint{other}, true, []corev1.Taint{other, Taint}, true},
		{"add when present", []corev1.Taint{Taint, other}, true, []corev1.Taint{Taint, other}, false},
		{"remove keeps others in place", []corev1.Taint{other, Taint, otherEffect}, false, []corev1.Taint{other, otherEffect}, true},
		{"remove any value", []corev1.Taint{{Key: TaintKey, Value: "x", Effect: corev1.TaintEffectNoSchedule}}, false, []corev1.Taint{}, true},
		{"remove when absent", []corev1.Taint{other, otherEffect}, false, []corev1.Taint{other, otherEffect}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			in := append([]corev1.Taint(nil), c.in...)
			out, changed := WithTaint(in, c.want)
			if changed != c.change || len(out) != len(c.out) {
				t.Fatalf("WithTaint(%v, %v) = %v, %v; want %v, %v", c.in, c.want, out, changed, c.out, c.change)
			}
			for i := range out {
				if out[i] != c.out[i] {
					t.Fatalf("WithTaint(%v, %v) = %v; want %v", c.in, c.want, out, c.out)
				}
			}
			for i := range in {
				if in[i] != c.in[i] {
					t.Fatalf("WithTaint modified its input: %v", in)
				}
			}
		})
	}
}

func TestTaintPatch(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name   string
		taints []corev1.Taint
		want   string
	}{
		{"set", []corev1.Taint{Taint}, `{"metadata":{"resourceVersion":"42"},"spec":{"taints":[{"key":"metaconceal.io/not-ready","effect":"NoSchedule"}]}}`},
		{"empty deletes the field", nil, `{"metadata":{"resourceVersion":"42"},"spec":{"taints":null}}`},
	} {
		got, err := TaintPatch("42", c.taints)
		if err != nil {
			t.Fatal(err)
		}
		var a, b any
		if err := json.Unmarshal(got, &a); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal([]byte(c.want), &b); err != nil {
			t.Fatal(err)
		}
		ga, _ := json.Marshal(a)
		gb, _ := json.Marshal(b)
		if string(ga) != string(gb) {
			t.Errorf("%s: patch %s, want %s", c.name, got, c.want)
		}
	}
	if _, err := TaintPatch("", nil); err == nil {
		t.Error("a patch without resourceVersion would not be conditional; want an error")
	}
}

func TestGuardPresent(t *testing.T) {
	t.Parallel()
	full := `*nat
:PREROUTING ACCEPT [0:0]
:METACONCEAL-GUARD - [0:0]
-A PREROUTING -m comment --comment "metaconceal host guard" -j METACONCEAL-GUARD
-A METACONCEAL-GUARD -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 169.254.169.252:988
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:METACONCEAL-GUARD - [0:0]
:METACONCEAL-GUARD-FROM - [0:0]
-A INPUT ! -i lo -m comment --comment "metaconceal host guard" -j METACONCEAL-GUARD
-A FORWARD -m comment --comment "metaconceal host guard" -j METACONCEAL-GUARD
-A FORWARD -m comment --comment "metaconceal host guard" -j METACONCEAL-GUARD-FROM
-A OUTPUT ! -o lo -m comment --comment "metaconceal host guard" -j METACONCEAL-GUARD-FROM
COMMIT
`
	cases := []struct {
		name, save, missing string
	}{
		{"installed", full, ""},
		{"nothing", "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n", "nat chain METACONCEAL-GUARD"},
		{"jump flushed", strings.Replace(full, "-A FORWARD -m comment --comment \"metaconceal host guard\" -j METACONCEAL-GUARD\n", "", 1), "filter FORWARD jump to METACONCEAL-GUARD"},
		{"from jump flushed", strings.Replace(full, "-A OUTPUT ! -o lo -m comment --comment \"metaconceal host guard\" -j METACONCEAL-GUARD-FROM\n", "", 1), "filter OUTPUT jump to METACONCEAL-GUARD-FROM"},
		{"nat chain gone", strings.Replace(strings.Replace(full, ":METACONCEAL-GUARD - [0:0]\n", "", 1), "-A PREROUTING -m comment --comment \"metaconceal host guard\" -j METACONCEAL-GUARD\n", "", 1), "nat chain"},
	}
	for _, c := range cases {
		snap, err := xtables.ParseSave(c.save)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		err = GuardPresent(snap)
		switch {
		case c.missing == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.missing != "" && (err == nil || !strings.Contains(err.Error(), c.missing)):
			t.Errorf("%s: err %v, want one naming %q", c.name, err, c.missing)
		}
	}
}

func TestNewRejects(t *testing.T) {
	t.Parallel()
	if _, err := New(Config{Node: "n", Checks: []Check{{Name: "x", Probe: nil}}}); err == nil {
		t.Error("no client: want an error")
	}
}
