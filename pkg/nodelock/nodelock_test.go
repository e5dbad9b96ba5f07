package nodelock

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Two agents at once: the second waits while the first holds the lock and takes it
// when the first releases it; a waiter whose context ends gets its error.
func TestOneHolderAtATime(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), ".node-agent.lock")
	ctx := context.Background()
	first, err := Acquire(ctx, path, "old-pod", nil)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *Lock, 1)
	go func() {
		l, err := Acquire(ctx, path, "new-pod", nil)
		if err != nil {
			t.Error(err)
		}
		got <- l
	}()
	// While the first holds it, the second has not got it (several polls later).
	select {
	case <-got:
		t.Fatal("the second agent got the lock while the first held it")
	case <-time.After(4 * PollInterval):
	}
	if b, _ := os.ReadFile(path); !strings.HasPrefix(string(b), "old-pod ") {
		t.Errorf("lock file %q, want the holder old-pod", b)
	}
	if err := first.Release(); err != nil {
		t.Fatal(err)
	}
	second := <-got
	defer second.Release()
	if b, _ := os.ReadFile(path); !strings.HasPrefix(string(b), "new-pod ") {
		t.Errorf("lock file %q after the takeover, want the holder new-pod", b)
	}

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := Acquire(cctx, path, "third", nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Acquire with a held lock and a cancelled context = %v, want context.Canceled", err)
	}
}
