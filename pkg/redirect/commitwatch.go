package redirect

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Why a deletion does not wait for iptables-nft-restore to exit: after a commit that
// deleted rules or chains, the kernel frees them from a work item that first waits for
// an RCU grace period (10-30 ms on a busy VM), and the release of any nf_tables netlink
// socket of that netns (NETLINK_URELEASE -> nf_tables_trans_destroy_flush_work) waits
// for that work while holding the netns's nf_tables commit mutex. A restore closes its
// socket right after its commit, so it used to spend the grace period in close(); and
// were it merely not waited for, the next plugin's DEL would pay instead: deleting the
// pod's interface takes the same mutex (nf_tables' netdev notifier).
//
// So restoreRemoval, for nf_tables only:
//   - opens chainWatch, a netlink socket of the pod netns, before the restore starts
//     and hands a duplicate of it to the process: its last reference, and the flush
//     its release brings, goes with the process, not with our close or exit;
//   - feeds the input through a socket that stays open after the input (the process
//     holds its other end) and times out reads after restoreLinger: once the input is
//     committed the process idles in read() that long, then takes the timeout for the
//     end of input, closes its netlink socket when the destroy work is long done, and
//     exits 0 (reparented, reaped by init or the nearest subreaper);
//   - returns as soon as the attachment's chain is gone from every table the input
//     deletes it from: restore commits table by table, each table as a whole with its
//     jumps, so all chains gone is the whole input committed.

// restoreLinger is how long a detached restore idles after its input before closing
// its netlink socket: well beyond an RCU grace period, short enough not to matter.
const restoreLinger = 500 * time.Millisecond

// commitPollInterval is how often a watched deletion asks the kernel whether it is
// committed; one query is a netlink round trip of a few microseconds.
const commitPollInterval = 500 * time.Microsecond

// commitQueryTimeout bounds one query; the kernel answers at once.
const commitQueryTimeout = time.Second

// maxLingeringInput bounds the input written into the stdin socket before the process
// starts (the socket buffers it); larger inputs, which this package never renders,
// take the plain path.
const maxLingeringInput = 64 << 10

// isNFTables reports whether program is an nf_tables iptables: iptables-nft-* or, via
// the alternatives symlinks, xtables-nft-multi. Anything else (legacy, a wrapper
// script named otherwise) is not, and its deletions are waited for.
func isNFTables(program string) bool {
	resolved, err := filepath.EvalSymlinks(program)
	if err != nil {
		return false
	}
	return strings.Contains(filepath.Base(resolved), "-nft")
}

// chainWatch asks nf_tables, over a netlink socket of the calling thread's netns,
// whether a chain exists in some tables of one family.
type chainWatch struct {
	conn   *netlink.Conn
	share  *os.File // a duplicate of conn's socket for the restore process
	family uint8
	chain  string
	tables []string
}

func openChainWatch(family Family, chain string, tables []string) (*chainWatch, error) {
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return nil, fmt.Errorf("redirect: nf_tables netlink socket: %w", err)
	}
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, errors.Join(fmt.Errorf("redirect: nf_tables netlink socket: %w", err), conn.Close())
	}
	var dup int
	var dupErr error
	if err := raw.Control(func(fd uintptr) { dup, dupErr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		dupErr = err
	}
	if dupErr != nil {
		return nil, errors.Join(fmt.Errorf("redirect: duplicating the nf_tables netlink socket: %w", dupErr), conn.Close())
	}
	nfFamily := uint8(unix.NFPROTO_IPV4)
	if family == IPv6 {
		nfFamily = unix.NFPROTO_IPV6
	}
	return &chainWatch{conn: conn, share: os.NewFile(uintptr(dup), "nfnetlink"), family: nfFamily, chain: chain, tables: tables}, nil
}

// exists asks whether table holds the chain: a chain GET, answered with the chain or
// ENOENT (also when the table does not exist).
func (w *chainWatch) exists(table string) (bool, error) {
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.NFTA_CHAIN_TABLE, table)
	ae.String(unix.NFTA_CHAIN_NAME, w.chain)
	attrs, err := ae.Encode()
	if err != nil {
		return false, err
	}
	req := netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETCHAIN), Flags: netlink.Request},
		// struct nfgenmsg: family, version NFNETLINK_V0, resource id 0.
		Data: append([]byte{w.family, unix.NFNETLINK_V0, 0, 0}, attrs...),
	}
	if err := w.conn.SetDeadline(time.Now().Add(commitQueryTimeout)); err != nil {
		return false, err
	}
	replies, err := w.conn.Execute(req)
	switch {
	case errors.Is(err, unix.ENOENT):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("redirect: nf_tables: get chain %s in table %s: %w", w.chain, table, err)
	case len(replies) != 1 || replies[0].Header.Type != netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWCHAIN):
		return false, fmt.Errorf("redirect: nf_tables: get chain %s in table %s: unexpected reply %+v", w.chain, table, replies)
	}
	return true, nil
}

// count returns in how many of the watched tables the chain exists.
func (w *chainWatch) count() (int, error) {
	n := 0
	for _, table := range w.tables {
		ok, err := w.exists(table)
		if err != nil {
			return 0, err
		}
		if ok {
			n++
		}
	}
	return n, nil
}

// gone reports whether the chain has left every watched table. The last table is
// asked first: restore commits it last.
func (w *chainWatch) gone() (bool, error) {
	for _, table := range slices.Backward(w.tables) {
		if ok, err := w.exists(table); err != nil || ok {
			return false, err
		}
	}
	return true, nil
}

// closeShare closes our copy of the duplicate once the restore process holds its own.
func (w *chainWatch) closeShare() error {
	if w.share == nil {
		return nil
	}
	err := w.share.Close()
	w.share = nil
	return err
}

func (w *chainWatch) close() error {
	return errors.Join(w.closeShare(), w.conn.Close())
}

// restoreRemoval runs a restore input that deletes chain (and the jumps to it) from
// tables. With ReturnOnCommit and an nf_tables iptables, when the chain is visible in
// all of tables first, it returns as soon as the chain is gone from all of them,
// leaving the process to finish on its own (see above). Otherwise, and whenever the
// process exits first, it waits for the process, whose exit status decides.
func (r *Runner) restoreRemoval(ctx context.Context, family Family, chain string, tables []string, input string) error {
	t, err := r.Tools(family)
	if err != nil {
		return err
	}
	if !r.ReturnOnCommit || len(tables) == 0 || len(input) > maxLingeringInput || !isNFTables(t.Restore) {
		return r.restore(ctx, family, input)
	}
	w, err := openChainWatch(family, chain, tables)
	if err != nil {
		r.noteWatchProblem(err)
		return r.restore(ctx, family, input)
	}
	// Closed once the process holds its copy (or has exited): see above.
	defer func() { _ = w.close() }() // a query socket: nothing to report
	armed := false
	if n, err := w.count(); err != nil {
		r.noteWatchProblem(err)
	} else {
		armed = n == len(tables)
	}

	r.count(t.Restore)
	defer r.addElapsed(time.Now())
	args := r.restoreArgs()
	var stdout, stderr bytes.Buffer
	// Not CommandContext: cancelling ctx after an early return must not kill the
	// process; before that, ctx is watched below.
	cmd := exec.Command(t.Restore, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr // pipes of its own: it never holds our stdout
	cmd.ExtraFiles = []*os.File{w.share}
	endInput := func() {}
	if armed {
		theirs, ours, err := lingeringStdin(input)
		if err != nil {
			r.noteWatchProblem(err)
			armed = false
		} else {
			defer ours.Close()   // the process holds a copy: no end of input for it
			defer theirs.Close() // the process reads its own copy
			cmd.Stdin = theirs
			cmd.ExtraFiles = append(cmd.ExtraFiles, ours)
			// Ends the input for the process at once: for waiting on it instead.
			endInput = func() { _ = unix.Shutdown(int(ours.Fd()), unix.SHUT_WR) }
		}
	}
	if !armed {
		cmd.Stdin = strings.NewReader(input)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("%s: %w", t.Restore, err)
	}
	if err := w.closeShare(); err != nil {
		r.noteWatchProblem(err)
	}
	exited := make(chan error, 1)
	// Waits (and so reaps the process) also after an early return, for as long as this
	// process lives; a plugin process exits first and the restore is reparented.
	go func() { exited <- cmd.Wait() }()
	result := func(err error) error {
		if err != nil {
			return fmt.Errorf("%w\ninput:\n%s", processError(t.Restore, args, err, &stderr), input)
		}
		return nil
	}
	var poll <-chan time.Time
	if armed {
		ticker := time.NewTicker(commitPollInterval)
		defer ticker.Stop()
		poll = ticker.C
	}
	for {
		select {
		case err := <-exited:
			return result(err)
		case <-ctx.Done():
			_ = cmd.Process.Kill() // it may have exited meanwhile; Wait tells
			return result(errors.Join(<-exited, ctx.Err()))
		case <-poll:
			gone, err := w.gone()
			if err != nil {
				r.noteWatchProblem(err)
				poll = nil
				endInput() // wait for the process instead, without its linger
				continue
			}
			if !gone {
				continue
			}
			select {
			case err := <-exited: // exited meanwhile: its status is the better answer
				return result(err)
			default:
			}
			r.mu.Lock()
			r.detached++
			r.mu.Unlock()
			return nil
		}
	}
}

// lingeringStdin returns a connected socket pair that already holds input: the
// process reads theirs as stdin, with reads timing out after restoreLinger, and is
// also given ours, so that the stream does not end when we close ours or exit.
func lingeringStdin(input string) (theirs, ours *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("redirect: socket pair for restore input: %w", err)
	}
	theirs, ours = os.NewFile(uintptr(fds[1]), "restore-input"), os.NewFile(uintptr(fds[0]), "restore-input-writer")
	tv := unix.NsecToTimeval(restoreLinger.Nanoseconds())
	if err = unix.SetsockoptTimeval(fds[1], unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err == nil {
		_, err = io.WriteString(ours, input)
	}
	if err != nil {
		return nil, nil, errors.Join(fmt.Errorf("redirect: restore input socket: %w", err), theirs.Close(), ours.Close())
	}
	return theirs, ours, nil
}
