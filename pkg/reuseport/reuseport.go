// Package reuseport opens listening sockets with SO_REUSEPORT, so that a second
// instance of a program (the surge pod of a rolling update, same user) binds the same
// address beside the first one and the address never stops accepting. The kernel
// spreads new connections over every socket of the group; once the old instance closes
// its listener, the connections still queued on it are reset, or moved to another
// listener of the group when net.ipv4.tcp_migrate_req is 1 (MigrateReq).
package reuseport

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// ListenConfig returns a net.ListenConfig whose sockets carry SO_REUSEPORT.
func ListenConfig() *net.ListenConfig {
	return &net.ListenConfig{Control: control}
}

func control(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("setsockopt SO_REUSEPORT: %w", serr)
	}
	return nil
}

// Listen opens a TCP listener on address with SO_REUSEPORT.
func Listen(ctx context.Context, address string) (net.Listener, error) {
	return ListenConfig().Listen(ctx, "tcp", address)
}

// MigrateReqFile is the sysctl that moves requests queued on a closing listener to
// another listener of its SO_REUSEPORT group (Linux 5.14 and later), under /proc/sys.
const MigrateReqFile = "net/ipv4/tcp_migrate_req"

// ErrMigrateReqUnsupported: the kernel has no net.ipv4.tcp_migrate_req.
var ErrMigrateReqUnsupported = errors.New("net.ipv4.tcp_migrate_req is not supported by this kernel (Linux 5.14 or later)")

// MigrateReq sets net.ipv4.tcp_migrate_req to 1, unless it already is, through procSys
// (where /proc/sys is mounted: "/proc/sys", or the node's /proc/sys mounted into a
// container whose own is read-only). A sysctl file acts on the network namespace of the
// thread that opens it: the caller's (the proxy runs in the node's). It reports
// whether it changed the value.
func MigrateReq(procSys string) (changed bool, err error) {
	return setSysctl(filepath.Join(procSys, MigrateReqFile), "1")
}

func setSysctl(path, want string) (bool, error) {
	cur, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, ErrMigrateReqUnsupported
	}
	if err != nil {
		return false, fmt.Errorf("reading %s: %w", path, err)
	}
	if strings.TrimSpace(string(cur)) == want {
		return false, nil
	}
	if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
		return false, fmt.Errorf("writing %s: %w", path, err)
	}
	return true, nil
}
