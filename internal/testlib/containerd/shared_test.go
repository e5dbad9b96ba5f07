package containerd

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// leaseWorld points the lease's lock, record and cgroup root at a temp dir with two
// "hierarchies" (plain directories: rmdir refuses a non-empty one as the kernel
// refuses a cgroup with children), and restores them when the test ends. The tests
// here change package variables, so none runs in parallel.
func leaseWorld(t *testing.T) (parents []string) {
	t.Helper()
	dir := t.TempDir()
	oldLock, oldRecord, oldRoot := leaseLockPath, leaseRecordPath, cgroupRoot
	t.Cleanup(func() { leaseLockPath, leaseRecordPath, cgroupRoot = oldLock, oldRecord, oldRoot })
	leaseLockPath = filepath.Join(dir, "lock", "runtimes.lock")
	leaseRecordPath = filepath.Join(dir, "runtimes.json")
	cgroupRoot = filepath.Join(dir, "cgroup")
	for _, h := range []string{"cpu", "memory"} {
		if err := os.MkdirAll(filepath.Join(cgroupRoot, h), 0o755); err != nil {
			t.Fatal(err)
		}
		parents = append(parents, filepath.Join(cgroupRoot, h, "k8s.io"))
	}
	return append(parents, filepath.Join(cgroupRoot, "k8s.io"))
}

// runPod stands for what runc does for a sandbox: the parent and a child below it.
func runPod(t *testing.T, parents []string, id string) {
	t.Helper()
	for _, p := range parents {
		if err := os.MkdirAll(filepath.Join(p, id), 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// stopPod is RemoveOutside's per-id part.
func stopPod(t *testing.T, parents []string, id string) {
	t.Helper()
	for _, p := range parents {
		if err := os.Remove(filepath.Join(p, id)); err != nil {
			t.Fatal(err)
		}
	}
}

func exist(paths []string) (n int) {
	for _, p := range paths {
		if _, err := os.Stat(p); err == nil {
			n++
		}
	}
	return n
}

func TestLeaseLastReleaseRemovesParents(t *testing.T) {
	parents := leaseWorld(t)
	a, err := AcquireLease("a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := AcquireLease("b")
	if err != nil {
		t.Fatal(err)
	}
	runPod(t, parents, "pod-a")
	runPod(t, parents, "pod-b")

	// a stops while b's pod runs: nothing shared is touched, no error.
	stopPod(t, parents, "pod-a")
	if errs := a.Release(); len(errs) != 0 {
		t.Fatalf("first release: %v", errs)
	}
	if n := exist(parents); n != len(parents) {
		t.Fatalf("after the first release %d of %d parents remain; b's pod lives below them", n, len(parents))
	}
	if errs := a.Release(); len(errs) != 0 {
		t.Fatalf("second release of the same lease: %v", errs)
	}
	// b, the last, removes the parents test runtimes created, and the record.
	stopPod(t, parents, "pod-b")
	if errs := b.Release(); len(errs) != 0 {
		t.Fatalf("last release: %v", errs)
	}
	if n := exist(parents); n != 0 {
		t.Errorf("after the last release %d parents remain", n)
	}
	if _, err := os.Stat(leaseRecordPath); !os.IsNotExist(err) {
		t.Errorf("record left after the last release: %v", err)
	}
}

func TestLeaseKeepsParentsItDidNotCreate(t *testing.T) {
	parents := leaseWorld(t)
	runPod(t, parents, "machine-pod") // a containerd of the machine's, before any test
	stopPod(t, parents, "machine-pod")
	l, err := AcquireLease("a")
	if err != nil {
		t.Fatal(err)
	}
	runPod(t, parents, "pod-a")
	stopPod(t, parents, "pod-a")
	if errs := l.Release(); len(errs) != 0 {
		t.Fatalf("release: %v", errs)
	}
	if n := exist(parents); n != len(parents) {
		t.Errorf("%d of %d parents that existed before any test runtime remain", n, len(parents))
	}
}

func TestLeaseDropsDeadHolders(t *testing.T) {
	parents := leaseWorld(t)
	// A holder whose process is gone (a killed test binary): pid 1 with a start time
	// that is not init's, and a pid that does not exist.
	rec := leaseRecord{
		Holders: []leaseHolder{{ID: "killed", PID: 1, Start: "not-a-start-time"}, {ID: "gone", PID: 1 << 30, Start: "1"}},
		Created: parents,
	}
	data, _ := json.Marshal(rec)
	if err := os.WriteFile(leaseRecordPath, data, 0o644); err != nil {
		t.Fatal(err)
	}
	runPod(t, parents, "left")
	stopPod(t, parents, "left")
	l, err := AcquireLease("a")
	if err != nil {
		t.Fatal(err)
	}
	data, err = os.ReadFile(leaseRecordPath)
	if err != nil {
		t.Fatal(err)
	}
	var got leaseRecord
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Holders) != 1 || got.Holders[0].ID != "a" {
		t.Errorf("holders after acquire: %+v, want only a", got.Holders)
	}
	if !slices.Equal(got.Created, parents) {
		t.Errorf("created after acquire: %v, want %v", got.Created, parents)
	}
	if errs := l.Release(); len(errs) != 0 {
		t.Fatalf("release: %v", errs)
	}
	if n := exist(parents); n != 0 {
		t.Errorf("%d parents remain after the last live holder released", n)
	}
}
