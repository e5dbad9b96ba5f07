package cliflag

import (
	"flag"
	"slices"
	"testing"
)

func TestListRepeatableAndCommaSeparated(t *testing.T) {
	t.Parallel()
	var l List
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	fs.Var(&l, "listen", "")
	if err := fs.Parse([]string{"--listen", "a:1, b:2", "--listen", "c:3", "--listen", " , "}); err != nil {
		t.Fatal(err)
	}
	if want := (List{"a:1", "b:2", "c:3"}); !slices.Equal(l, want) {
		t.Fatalf("List = %q, want %q", l, want)
	}
	if got := l.String(); got != "a:1,b:2,c:3" {
		t.Fatalf("String = %q", got)
	}
}
