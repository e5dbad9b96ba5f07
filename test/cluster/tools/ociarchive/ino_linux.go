package main

import (
	"io/fs"
	"syscall"
)

// statIno returns a file's device and inode numbers, to keep hard links as links.
func statIno(info fs.FileInfo) ([2]uint64, bool) {
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok || st.Nlink < 2 {
		return [2]uint64{}, false
	}
	return [2]uint64{uint64(st.Dev), st.Ino}, true
}
