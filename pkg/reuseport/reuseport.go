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

// MigrateReqPath is the sysctl that moves requests queued on a closing listener to
// another listener of its SO_REUSEPORT group (Linux 5.14 and later).
const MigrateReqPath = "/proc/sys/net/ipv4/tcp_migrate_req"

// ErrMigrateReqUnsupported: the kernel has no net.ipv4.tcp_migrate_req.
var ErrMigrateReqUnsupported = errors.New("net.ipv4.tcp_migrate_req is not supported by this kernel (Linux 5.14 or later)")

// MigrateReq sets net.ipv4.tcp_migrate_req to 1 in the network namespace of the
// calling thread (the proxy runs in the node's), unless it already is. It reports
// whether it changed the value.
func MigrateReq() (changed bool, err error) {
	return setSysctl(MigrateReqPath, "1")
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
