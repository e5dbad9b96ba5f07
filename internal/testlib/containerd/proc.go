package containerd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
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

// KillShims kills any containerd-shim-runc-v2 still serving the containerd at socket,
// told apart from anything else on the machine by the -address of that socket, and
// first the sandbox and container processes they started: killed alone, a shim leaves
// them running. It waits (briefly) until they are gone, so their cgroups can be removed.
func KillShims(socket string) error {
	type proc struct {
		pid, ppid int
		shim      bool
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return fmt.Errorf("list processes: %w", err)
	}
	var procs []proc
	ours := map[int]bool{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		p := proc{pid: pid, ppid: parentPID(pid)}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil {
			args := strings.Split(string(cmdline), "\x00")
			p.shim = strings.Contains(filepath.Base(args[0]), "containerd-shim") && bytes.Contains(cmdline, []byte(socket))
		}
		if p.shim {
			ours[pid] = true
		}
		procs = append(procs, p)
	}
	var errs []error
	var killed []int
	kill := func(pid int) {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("kill %d: %w", pid, err))
			return
		}
		killed = append(killed, pid)
	}
	for _, p := range procs {
		if !p.shim && ours[p.ppid] {
			kill(p.pid)
		}
	}
	for pid := range ours {
		kill(pid)
	}
	// Wait (briefly) until they are gone, so their cgroups can be removed next.
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range killed {
		for time.Now().Before(deadline) && parentPID(pid) != 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	return errors.Join(errs...)
}

// parentPID is pid's parent from /proc/<pid>/stat; 0 once the process is gone (or a
// zombie, which holds no cgroup).
func parentPID(pid int) int {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0
	}
	// "pid (comm) state ppid ...": comm may hold spaces and parentheses.
	fields := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	if len(fields) < 2 || fields[0] == "Z" {
		return 0
	}
	ppid, _ := strconv.Atoi(fields[1])
	return ppid
}
