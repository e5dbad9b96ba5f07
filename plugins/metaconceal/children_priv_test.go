package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/metaconceal/metaconceal/internal/testlib/simnode"
	"github.com/metaconceal/metaconceal/internal/testutil"
)

// subreaperEnv makes the test binary, re-executed, act as the subreaper that runs the
// plugin (see runUnderSubreaper).
const subreaperEnv = "METACONCEAL_TEST_SUBREAPER"

// survivorsExit is the subreaper's exit status when a process outlived the plugin.
const survivorsExit = 97

func TestMain(m *testing.M) {
	if os.Getenv(subreaperEnv) == "1" {
		os.Exit(runUnderSubreaper(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// runUnderSubreaper marks this process a child subreaper, runs argv with its stdio,
// and, once it has exited, looks for processes it left behind: every descendant the
// plugin did not wait for was reparented here when the plugin exited, so any child of
// this process now (running or a zombie) outlived the plugin. They are named on
// stderr, killed and reaped, and the exit status is survivorsExit; otherwise it is
// the plugin's own.
func runUnderSubreaper(argv []string) int {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "subreaper: prctl:", err)
		return 2
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	runErr := cmd.Run()
	var exitErr *exec.ExitError
	if runErr != nil && !errors.As(runErr, &exitErr) {
		fmt.Fprintln(os.Stderr, "subreaper:", runErr)
		return 2
	}
	survivors, err := childrenOf(os.Getpid())
	if err != nil {
		fmt.Fprintln(os.Stderr, "subreaper:", err)
		return 2
	}
	if len(survivors) > 0 {
		for _, s := range survivors {
			fmt.Fprintf(os.Stderr, "subreaper: survivor pid %d %s\n", s.pid, s.desc)
			_ = syscall.Kill(s.pid, syscall.SIGKILL)
			var ws syscall.WaitStatus
			_, _ = syscall.Wait4(s.pid, &ws, 0, nil)
		}
		return survivorsExit
	}
	return cmd.ProcessState.ExitCode()
}

type proc struct {
	pid  int
	desc string // command and state, from /proc/PID/stat
}

// childrenOf lists the processes whose parent is ppid, zombies included, from /proc.
func childrenOf(ppid int) ([]proc, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var out []proc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue // exited meanwhile
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		s := string(stat)
		end := strings.LastIndexByte(s, ')')
		if end < 0 {
			return nil, fmt.Errorf("/proc/%d/stat: unexpected %q", pid, s)
		}
		fields := strings.Fields(s[end+1:])
		if len(fields) < 2 {
			return nil, fmt.Errorf("/proc/%d/stat: unexpected %q", pid, s)
		}
		parent, err := strconv.Atoi(fields[1])
		if err != nil {
			return nil, fmt.Errorf("/proc/%d/stat: ppid: %w", pid, err)
		}
		if parent == ppid {
			out = append(out, proc{pid: pid, desc: s[strings.IndexByte(s, '('):end+1] + " state " + fields[0]})
		}
	}
	return out, nil
}

// No process the plugin starts outlives its verb: the real binary runs every verb under
// a subreaper that reports any process left behind when the plugin exits. Both
// backends, every verb (ADD, CHECK, DEL, a second DEL, an ADD on the rules DEL left,
// which reconciles through iptables-save, GC) and STATUS; DEL and GC leave the rules to
// the netns. The subreaper is checked first with a command that does leave a process
// behind, so the test can fail.
func TestNoChildOutlivesVerb(t *testing.T) {
	testutil.RequirePrivileged(t, "ip", "iptables-restore", "iptables-save", "iptables-legacy-restore", "go")
	t.Parallel()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "metaconceal")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	// The control: a shell that leaves a sleep running.
	control := exec.Command(exe, "sh", "-c", "sleep 30 & exit 0")
	control.Env = append(os.Environ(), subreaperEnv+"=1")
	var controlErr bytes.Buffer
	control.Stderr = &controlErr
	err = control.Run()
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != survivorsExit || !strings.Contains(controlErr.String(), "survivor pid") {
		t.Fatalf("subreaper missed a process left behind: %v, stderr %q", err, controlErr.String())
	}

	for _, backend := range []string{"nft", "legacy"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			node, err := simnode.New("mc-kids")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := node.Close(); err != nil {
					t.Errorf("close node: %v", err)
				}
			})
			podName, podPath, err := node.NewPodNS("mc-kids-pod")
			if err != nil {
				t.Fatal(err)
			}
			stateDir := t.TempDir()
			common := `"cniVersion":"1.1.0","name":"kids","type":"metaconceal","iptablesBackend":"` + backend + `","stateDir":"` + stateDir + `"`
			withPrev := `{` + common + `,"prevResult":{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"` + podPath + `"}],"ips":[{"address":"10.22.0.7/24","interface":0}]}}`
			gcConf := `{` + common + `,"cni.dev/valid-attachments":[]}`

			steps := []struct {
				verb, conf string
				wantOK     bool // STATUS fails: no proxy listens in this node
				wantRules  bool // the pod's rules after the verb
			}{
				{"ADD", withPrev, true, true},
				{"CHECK", withPrev, true, true},
				{"DEL", withPrev, true, true},
				{"DEL", withPrev, true, true},
				{"ADD", withPrev, true, true},
				{"CHECK", withPrev, true, true},
				{"GC", gcConf, true, true},
				{"STATUS", gcConf, false, true},
			}
			for i, s := range steps {
				cmd := node.Command(context.Background(), "env", subreaperEnv+"=1", "CNI_COMMAND="+s.verb, "CNI_CONTAINERID=kids-c1",
					"CNI_IFNAME=eth0", "CNI_NETNS="+podPath, "CNI_PATH="+filepath.Dir(bin),
					"CNI_ARGS=K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p1", exe, bin)
				var stdout, stderr bytes.Buffer
				cmd.Stdin, cmd.Stdout, cmd.Stderr = strings.NewReader(s.conf), &stdout, &stderr
				err := cmd.Run()
				code := 0
				if err != nil {
					if !errors.As(err, &exitErr) {
						t.Fatalf("step %d %s: %v", i, s.verb, err)
					}
					code = exitErr.ExitCode()
				}
				if code == survivorsExit {
					t.Errorf("step %d %s: a process outlived the plugin:\n%s", i, s.verb, stderr.String())
					continue
				}
				if (code == 0) != s.wantOK {
					t.Errorf("step %d %s: exit %d, stdout %q\n%s", i, s.verb, code, stdout.String(), stderr.String())
				}
				saved, err := simnode.Run(context.Background(), "ip", "netns", "exec", podName, "iptables-"+backend+"-save")
				if err != nil {
					t.Fatal(err)
				}
				if got := strings.Contains(saved, "METACONCEAL-"); got != s.wantRules {
					t.Errorf("step %d %s: rules present %v, want %v:\n%s", i, s.verb, got, s.wantRules, saved)
				}
			}
		})
	}
}
