package containerd

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Proc is one node component process (containerd, the kubelet, etcd, ...) started in
// the node's network namespace (nsenter --net: network only; the filesystem and mounts
// stay the machine's, as a node's components see them), its output in a log file of
// its own.
type Proc struct {
	Name    string
	Cmd     *exec.Cmd
	LogPath string
	exited  chan struct{}
	err     error
}

// StartProc starts bin with args in the netns at netnsPath, writing its output to
// logPath. nsenter --net, not `ip netns exec`: the latter also gives the program a
// private mount namespace, so the netns bind mounts containerd makes for each sandbox
// would be invisible (and unremovable) from the caller's mount namespace.
func StartProc(netnsPath, logPath, name, bin string, args ...string) (*Proc, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("create %s log: %w", name, err)
	}
	cmd := exec.Command("nsenter", append([]string{"--net=" + netnsPath, bin}, args...)...)
	cmd.Stdout, cmd.Stderr = f, f
	// A process group of its own: a Ctrl-C on the terminal reaches only the runner,
	// which then stops everything in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{Name: name, Cmd: cmd, LogPath: logPath, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.exited)
	}()
	return p, nil
}

// Exited is closed when the process has exited.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// Running reports whether the process has not exited yet.
func (p *Proc) Running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// Stop sends SIGTERM, waits up to grace, then SIGKILLs the process group; nil when it
// exited in time (or had already exited).
func (p *Proc) Stop(grace time.Duration) error {
	if !p.Running() {
		return nil
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-time.After(grace):
	}
	_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
		return fmt.Errorf("%s (pid %d) did not exit after SIGKILL", p.Name, p.Cmd.Process.Pid)
	}
	return fmt.Errorf("%s did not stop within %s of SIGTERM; killed", p.Name, grace)
}

// ExitedErr describes an exit (once Exited is closed) with the log's last n lines.
func (p *Proc) ExitedErr(n int) error {
	return fmt.Errorf("%s exited (%v); last lines of %s:\n%s", p.Name, p.err, p.LogPath, Tail(p.LogPath, n))
}

// Tail returns the last n lines of a file, for failure messages.
func Tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
