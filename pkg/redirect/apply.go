package redirect

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/metaconceal/metaconceal/pkg/xtables"
)

// Apply installs spec in the current netns with r's programs, atomically: one iptables-restore. When
// mayExist is false (no state record for the attachment) the chains are created with
// -N in a single process; if that fails because they exist after all, or when mayExist
// is true, Apply takes a snapshot and rewrites the attachment's rules to exactly spec
// (one iptables-save, one iptables-restore), so ADD twice leaves one set of rules.
func Apply(ctx context.Context, r *xtables.Runner, spec Spec, mayExist bool) error {
	tables, err := Render(spec)
	if err != nil {
		return err
	}
	chain := spec.Attachment.Chain()
	var fastErr error
	if !mayExist {
		if fastErr = r.Restore(ctx, spec.Family, AddRestore(tables, chain)); fastErr == nil {
			return nil
		}
	}
	snap, err := r.Snapshot(ctx, spec.Family)
	if err != nil {
		return errors.Join(fastErr, err)
	}
	if err := r.Restore(ctx, spec.Family, ReconcileRestore(tables, chain, snap)); err != nil {
		return errors.Join(fastErr, err)
	}
	return nil
}

// Remove deletes the attachment's jumps and chains of spec's family from the current
// netns. When likelyPresent (the state record exists) it first tries one restore that
// deletes exactly what Apply made; otherwise, or when that fails, it takes a snapshot
// and removes whatever of the attachment is there. It reports whether anything was
// there to remove; nothing there is not an error.
func Remove(ctx context.Context, r *xtables.Runner, spec Spec, likelyPresent bool) (bool, error) {
	chain := spec.Attachment.Chain()
	var fastErr error
	if likelyPresent {
		tables, err := Render(spec)
		if err != nil {
			return false, err
		}
		if fastErr = r.Restore(ctx, spec.Family, DeleteRestore(tables, chain)); fastErr == nil {
			return true, nil
		}
	}
	snap, err := r.Snapshot(ctx, spec.Family)
	if err != nil {
		return false, errors.Join(fastErr, err)
	}
	input := RemovalRestore(chain, snap)
	if input == "" {
		return false, nil
	}
	if err := r.Restore(ctx, spec.Family, input); err != nil {
		return false, errors.Join(fastErr, err)
	}
	return true, nil
}

// Check verifies, through go-iptables, that spec is installed in the current netns:
// each table's chain holds exactly the rendered rules, in order, and OUTPUT jumps to
// it. The error names what is missing or differs.
func Check(r *xtables.Runner, spec Spec) error {
	tables, err := Render(spec)
	if err != nil {
		return err
	}
	t, err := r.Tools(spec.Family)
	if err != nil {
		return err
	}
	ipt, err := r.IPTables(spec.Family) // counts the "iptables --version" of go-iptables' New
	if err != nil {
		return fmt.Errorf("redirect: %w", err)
	}
	chain := spec.Attachment.Chain()
	var problems []string
	for _, tr := range tables {
		r.Started(t.Iptables)
		got, err := ipt.List(tr.Table, chain)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s table: chain %s of attachment %s is missing (%v)", tr.Table, chain, spec.Attachment, err))
			continue
		}
		// iptables-nft warns with a "#" line when legacy tables exist too.
		got = slices.DeleteFunc(got, func(l string) bool { return strings.HasPrefix(l, "#") })
		want := []string{"-N " + chain}
		for _, rule := range tr.Chain {
			want = append(want, "-A "+chain+" "+rule.String())
		}
		if !slices.Equal(got, want) {
			problems = append(problems, fmt.Sprintf("%s table: chain %s differs:\n  want %q\n  got  %q", tr.Table, chain, want, got))
		}
		r.Started(t.Iptables)
		ok, err := ipt.Exists(tr.Table, "OUTPUT", tr.Jump...)
		switch {
		case err != nil:
			problems = append(problems, fmt.Sprintf("%s table: checking the OUTPUT jump to %s: %v", tr.Table, chain, err))
		case !ok:
			problems = append(problems, fmt.Sprintf("%s table: OUTPUT has no rule %q", tr.Table, "-A OUTPUT "+tr.Jump.String()))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("redirect: %s rules of attachment %s: %s", spec.Family, spec.Attachment, strings.Join(problems, "; "))
	}
	return nil
}
