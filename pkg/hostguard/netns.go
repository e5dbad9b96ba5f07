package hostguard

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// netnsID identifies a network namespace (the device and inode of its nsfs file).
type netnsID struct{ dev, ino uint64 }

// threadNetns returns the network namespace of the calling thread.
func threadNetns() (netnsID, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return netnsID{}, fmt.Errorf("hostguard: reading this thread's network namespace: %w", err)
	}
	return netnsID{dev: uint64(st.Dev), ino: st.Ino}, nil
}

// inHome runs fn on a locked thread after checking that the thread is in the network
// namespace home: a goroutine of a process that switched only some of its threads into
// a node's namespace (a test, say) must never program another namespace's rules, the
// machine's own included. In a process that runs wholly in the node's namespace (the
// proxy) the check always holds. The zero home skips the check.
func inHome(home netnsID, fn func() error) error {
	if home == (netnsID{}) {
		return fn()
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cur, err := threadNetns()
	if err != nil {
		return err
	}
	if cur != home {
		return fmt.Errorf("hostguard: this thread is in another network namespace (inode %d) than the guard was created in (inode %d): nothing changed", cur.ino, home.ino)
	}
	return fn()
}
