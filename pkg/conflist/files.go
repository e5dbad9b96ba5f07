package conflist

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/containernetworking/cni/libcni"

	"github.com/metaconceal/metaconceal/internal/fsutil"
)

// Extensions are the file extensions containerd (go-cni) and CRI-O (ocicni) read from
// the CNI conf dir: .conflist as a list, .conf and .json as a single plugin.
var Extensions = []string{".conf", ".conflist", ".json"}

// ErrNoConfig reports a conf dir holding no network configuration yet.
var ErrNoConfig = errors.New("no CNI network configuration")

// tempMarker is part of every temporary file name this package creates. Its extension
// is never one of Extensions, so the runtime never loads a half-written file of ours.
const tempMarker = ".metaconceal-tmp-"

// IsTempFile reports whether name is one of this package's temporary files.
func IsTempFile(name string) bool { return strings.Contains(filepath.Base(name), tempMarker) }

// Candidates lists the network configuration files of dir in the order the runtime
// considers them: libcni.ConfFiles (regular entries whose extension is one of
// Extensions, hidden ones included, since libcni does not skip them) sorted by name.
// A missing dir has no candidates.
func Candidates(dir string) ([]string, error) {
	files, err := libcni.ConfFiles(dir, Extensions)
	if err != nil {
		return nil, fmt.Errorf("listing CNI conf dir %s: %w", dir, err)
	}
	sort.Strings(files)
	return files, nil
}

// Primary returns the path of the configuration the runtime uses: containerd loads
// the first of Candidates (max_conf_num = 1) and fails when it does not parse, so that
// is the one file to patch. It returns an error wrapping ErrNoConfig when there is none.
func Primary(dir string) (string, error) {
	files, err := Candidates(dir)
	if err != nil {
		return "", err
	}
	if len(files) == 0 {
		return "", fmt.Errorf("%w in %s", ErrNoConfig, dir)
	}
	return files[0], nil
}

// Change describes what Install or Uninstall did to one file.
type Change struct {
	Path    string // the file written or examined
	Removed string // a file removed by a .conf <-> .conflist switch, if any
	Action  Action
}

// Install puts the entry into the primary configuration of dir, atomically, keeping
// the file's mode and owner. A single-plugin .conf/.json becomes NAME.conflist: the new
// file is written first and the old one removed after, so the runtime always finds a
// complete primary config (first the old one, then the new one; never none). Nothing is
// written when the file cannot be parsed or cannot take a chained plugin.
func Install(dir string, entry Entry) (Change, error) {
	primary, err := Primary(dir)
	if err != nil {
		return Change{}, err
	}
	data, info, err := readConfig(primary)
	if err != nil {
		return Change{}, err
	}
	if filepath.Ext(primary) == ".conflist" {
		out, action, err := Insert(data, entry)
		if err != nil {
			return Change{Path: primary}, fmt.Errorf("%s: %w", primary, err)
		}
		if err := checkNoPluginDir(dir, data); err != nil {
			return Change{Path: primary}, fmt.Errorf("%s: %w", primary, err)
		}
		if action != Unchanged {
			if err := WriteFileAtomic(primary, out, info); err != nil {
				return Change{Path: primary}, err
			}
		}
		return Change{Path: primary, Action: action}, nil
	}
	return convert(dir, primary, data, info, entry)
}

func convert(dir, primary string, data []byte, info fs.FileInfo, entry Entry) (Change, error) {
	base := filepath.Base(primary)
	target := strings.TrimSuffix(primary, filepath.Ext(primary)) + ".conflist"
	ch := Change{Path: target, Removed: primary, Action: Converted}
	files, err := Candidates(dir)
	if err != nil {
		return ch, err
	}
	for _, f := range files {
		if f == primary || f == target {
			continue
		}
		if f < target {
			return ch, fmt.Errorf("%s: %w: converting it to %s would make %s the primary config instead", primary, ErrNotChainable, filepath.Base(target), filepath.Base(f))
		}
	}
	if existing, err := os.ReadFile(target); err == nil {
		doc, perr := parseConflist(existing)
		if perr != nil || doc.convertedOf != base {
			return ch, fmt.Errorf("%s: %w: %s already exists and was not made from it by metaconceal", primary, ErrNotChainable, filepath.Base(target))
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return ch, fmt.Errorf("reading %s: %w", target, err)
	}
	out, err := ConvertConf(data, base, entry)
	if err != nil {
		return ch, fmt.Errorf("%s: %w", primary, err)
	}
	if err := WriteFileAtomic(target, out, info); err != nil {
		return ch, err
	}
	if err := os.Remove(primary); err != nil {
		return ch, fmt.Errorf("removing %s after writing %s: %w", primary, target, err)
	}
	return ch, fsutil.SyncDir(dir)
}

// checkNoPluginDir refuses a list whose plugins libcni would extend with files from
// dir/<name>/ (CNI spec 1.1): those run after the inlined ones, so the entry would not
// be last, and the main plugin might not even be before it.
func checkNoPluginDir(dir string, data []byte) error {
	list, err := libcni.NetworkConfFromBytes(data)
	if err != nil {
		return fmt.Errorf("the runtime could not load it: %w", err)
	}
	if list.LoadOnlyInlinedPlugins || list.Name == "" || strings.ContainsAny(list.Name, `/\`) || list.Name == "." || list.Name == ".." {
		return nil
	}
	pluginDir := filepath.Join(dir, list.Name)
	files, err := libcni.ConfFiles(pluginDir, []string{".conf"})
	if err != nil {
		return fmt.Errorf("listing %s: %w", pluginDir, err)
	}
	if len(files) > 0 {
		return fmt.Errorf("%w: the runtime appends plugin configs from %s after the inlined ones", ErrNotChainable, pluginDir)
	}
	return nil
}

// Uninstall removes the entry from every configuration file of dir that has one (the
// primary may have changed since install), and turns a conflist this package made from
// a .conf back into that .conf. It goes on after a file it cannot handle and returns
// every error joined.
func Uninstall(dir string) ([]Change, error) {
	files, err := Candidates(dir)
	if err != nil {
		return nil, err
	}
	var changes []Change
	var errs []error
	for _, f := range files {
		ch, err := uninstallFile(dir, f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if ch.Action != "" {
			changes = append(changes, ch)
		}
	}
	return changes, errors.Join(errs...)
}

func uninstallFile(dir, path string) (Change, error) {
	if filepath.Ext(path) != ".conflist" {
		return Change{}, nil // a single-plugin file never holds a chained entry
	}
	// A file that does not even name the plugin is none of our business, whatever it is.
	if raw, err := os.ReadFile(path); err == nil && !strings.Contains(string(raw), `"`+PluginType+`"`) {
		return Change{}, nil
	}
	data, info, err := readConfig(path)
	if err != nil {
		return Change{Path: path}, err
	}
	out, action, err := Remove(data)
	if err != nil {
		return Change{Path: path}, fmt.Errorf("%s: %w", path, err)
	}
	if action == Absent {
		return Change{}, nil
	}
	name, original, ok, err := Revert(data)
	if err != nil {
		return Change{Path: path}, fmt.Errorf("%s: %w", path, err)
	}
	if !ok {
		if err := WriteFileAtomic(path, out, info); err != nil {
			return Change{Path: path}, err
		}
		return Change{Path: path, Action: Removed}, nil
	}
	// Write the .conf back first, then remove the list: the runtime always finds a
	// complete config. If the .conf is back already (its owner re-created it), the list
	// is a stale copy of ours and only goes away.
	restored := filepath.Join(dir, name)
	ch := Change{Path: restored, Removed: path, Action: Reverted}
	if _, err := os.Lstat(restored); errors.Is(err, fs.ErrNotExist) {
		if err := WriteFileAtomic(restored, original, info); err != nil {
			return ch, err
		}
	} else if err != nil {
		return ch, fmt.Errorf("checking %s: %w", restored, err)
	} else {
		ch.Path = path
		ch.Action = Removed
	}
	if err := os.Remove(path); err != nil {
		return ch, fmt.Errorf("removing %s: %w", path, err)
	}
	return ch, fsutil.SyncDir(dir)
}

func readConfig(path string) ([]byte, fs.FileInfo, error) {
	// A symlink would be replaced by a regular file on rename, cutting it from whatever
	// its owner updates; and inside a container it may resolve to another file than on
	// the host. Refuse rather than guess.
	if info, err := os.Lstat(path); err == nil && info.Mode()&fs.ModeSymlink != 0 {
		return nil, nil, fmt.Errorf("%s is a symbolic link; refusing to replace it (patch its target by hand)", path)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("opening %s: %w", path, err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("stat %s: %w", path, err)
	}
	if !info.Mode().IsRegular() {
		return nil, nil, fmt.Errorf("%s is not a regular file", path)
	}
	data, err := readAll(f)
	if err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", path, err)
	}
	return data, info, nil
}

// WriteFileAtomic replaces path with data: a temporary file in the same directory
// (whose name the runtime never loads), fsync, the mode and owner of like (when like is
// not nil; otherwise 0644), rename over path, fsync of the directory. A reader sees the
// old file or the new one, never a part of either.
func WriteFileAtomic(path string, data []byte, like fs.FileInfo) error {
	mode := fs.FileMode(0o644)
	if like != nil {
		mode = like.Mode().Perm()
	}
	return fsutil.ReplaceFile(path, "."+filepath.Base(path)+tempMarker+"*", mode, func(tmp *os.File) error {
		if _, err := tmp.Write(data); err != nil {
			return fmt.Errorf("writing %s: %w", tmp.Name(), err)
		}
		if like != nil {
			if err := keepOwner(tmp, like); err != nil {
				return fmt.Errorf("keeping the owner of %s: %w", path, err)
			}
		}
		return nil
	})
}

func keepOwner(f *os.File, like fs.FileInfo) error {
	want, ok := like.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	got, err := f.Stat()
	if err != nil {
		return err
	}
	have, ok := got.Sys().(*syscall.Stat_t)
	if !ok || (have.Uid == want.Uid && have.Gid == want.Gid) {
		return nil
	}
	return f.Chown(int(want.Uid), int(want.Gid))
}
