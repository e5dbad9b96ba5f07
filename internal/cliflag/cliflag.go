// Package cliflag holds flag.Value types shared by the project's commands.
package cliflag

import "strings"

// List is a repeatable flag that also accepts comma-separated values; blanks are dropped.
type List []string

func (l *List) String() string { return strings.Join(*l, ",") }

// Set appends the comma-separated items of v.
func (l *List) Set(v string) error {
	for item := range strings.SplitSeq(v, ",") {
		if item = strings.TrimSpace(item); item != "" {
			*l = append(*l, item)
		}
	}
	return nil
}
