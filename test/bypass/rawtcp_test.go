package bypass

// The attacker: a process with CAP_NET_RAW only (in the default capability set of
// containerd and of PSA baseline) that speaks TCP by hand over an AF_PACKET socket
// (pkg/rawtcp). Frames sent that way never pass the pod netns's iptables OUTPUT hooks,
// so the per-pod rules the CNI plugin installs cannot see them; only the node can.

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/metaconceal/metaconceal/pkg/rawtcp"
)

// Environment of the helper process (see TestMain).
const (
	helperEnv    = "MC_BYPASS_RAW_HELPER"
	helperIfEnv  = "MC_BYPASS_IF"
	helperSrcEnv = "MC_BYPASS_SRC"
	helperGWEnv  = "MC_BYPASS_GW"
	helperDstEnv = "MC_BYPASS_DST"
	helperReqEnv = "MC_BYPASS_REQUEST"
)

// capNetRawOnly is CapEff with only CAP_NET_RAW (bit 13).
const capNetRawOnly = 1 << unix.CAP_NET_RAW

// runRawHelper is the helper process's main: it checks that it holds CAP_NET_RAW and
// nothing else, runs one hand-made HTTP exchange and writes the answer to stdout.
func runRawHelper() int {
	capEff, err := effectiveCaps()
	if err != nil {
		fmt.Fprintln(os.Stderr, "raw helper:", err)
		return 3
	}
	if capEff != capNetRawOnly {
		fmt.Fprintf(os.Stderr, "raw helper: CapEff = %#x, want %#x (CAP_NET_RAW only)\n", capEff, capNetRawOnly)
		return 3
	}
	src, err1 := netip.ParseAddr(os.Getenv(helperSrcEnv))
	gw, err2 := netip.ParseAddr(os.Getenv(helperGWEnv))
	dst, err3 := netip.ParseAddrPort(os.Getenv(helperDstEnv))
	if err := errors.Join(err1, err2, err3); err != nil {
		fmt.Fprintln(os.Stderr, "raw helper:", err)
		return 2
	}
	// The spare address is on nobody's interface: the pod's kernel drops the answers
	// instead of resetting a connection it does not know, and the client answers ARP
	// for it (see pkg/rawtcp).
	c := rawtcp.Client{IfName: os.Getenv(helperIfEnv), Src: src, NextHop: gw, Dst: dst, ClaimSrc: true}
	out, err := c.Exchange([]byte(os.Getenv(helperReqEnv)), 6*time.Second)
	os.Stdout.Write(out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "raw helper:", err)
		return 1
	}
	return 0
}

// effectiveCaps reads CapEff from /proc/self/status.
func effectiveCaps() (uint64, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, err
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, errors.New("no CapEff in /proc/self/status")
}
