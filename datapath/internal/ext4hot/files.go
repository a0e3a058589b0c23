package ext4hot

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"io"
	"slices"

	"github.com/ferry-dev/ferry/blockdev"
)

// A machine that starts on a migration's target reads its own files first
// (a database its log, ferry's records workload its whole records file),
// one fetch per extent while it waits; files appended with an fsync at a
// time are scattered in many small extents. RecentFiles lists the data of
// the regular files most recently modified, from the first flex group's
// inodes (those the mount and the first files use): read ahead with the
// metadata, the machine finds them local.

// RecentLimits bound RecentFiles: a few MiB, so the read-ahead does not
// hold the machine's own first reads back for long behind it on the
// source's connection.
var RecentLimits = Limits{MaxBytes: 2 << 20, MaxRanges: 256}

const (
	modeTypeMask   = 0xF000
	modeRegular    = 0x8000
	maxLeafReads   = 16    // extent leaves read, across all files
	maxExtentDepth = 1     // deeper trees are left to on-demand fetches
	uninitLen      = 32768 // ee_len above this: an unwritten extent (reads as zeros)
)

type recentFile struct {
	mtime int64
	root  []byte // the inode's i_block: its extent tree's root
}

// RecentFiles reads the filesystem on r (size bytes) and lists, in its
// byte offsets, sorted and merged, the written data of its regular files
// in the first flex group, most recently modified first, up to lim. It
// reads the inode tables' used blocks and at most maxLeafReads extent
// leaves; everything read is the source's word and checked as in Ranges.
func RecentFiles(r io.ReaderAt, size int64, lim Limits) ([]blockdev.Range, error) {
	s, sb, err := readSuper(r, size)
	if err != nil {
		return nil, err
	}
	if s.metaBG || !s.csum {
		return nil, nil // descriptors scattered, or the used inodes unknown
	}
	bs := s.blockSize
	gdtBlock := s.firstDataBlock + 1
	ngroups := min(s.groups, s.groupsPerFlex)
	gdt := make([]byte, ngroups*s.descSize)
	if _, err := r.ReadAt(gdt, gdtBlock*bs); err != nil {
		return nil, fmt.Errorf("read the ext4 group descriptors: %w", err)
	}
	le := binary.LittleEndian
	onFS := func(blk, n int64) bool { return blk > 0 && n > 0 && blk < s.blocks && n <= s.blocks-blk }
	// The reserved inodes (the journal's among them) are not the machine's
	// files.
	firstIno := int64(11)
	if le.Uint32(sb[0x4C:]) >= 1 {
		firstIno = max(firstIno, int64(le.Uint32(sb[0x54:])))
	}
	leaves := 0
	var files []recentFile // their roots point into the tables read
	for g := int64(0); g < ngroups; g++ {
		d := gdt[g*s.descSize : (g+1)*s.descSize]
		if le.Uint16(d[0x12:])&bgInodeUninit != 0 {
			continue
		}
		itable := int64(le.Uint32(d[0x8:]))
		unused := int64(le.Uint16(d[0x1C:]))
		if s.descSize >= 64 {
			itable |= int64(le.Uint32(d[0x28:])) << 32
			unused |= int64(le.Uint16(d[0x32:])) << 16
		}
		used := s.inodesPerGroup - unused
		if used <= 0 || used > s.inodesPerGroup {
			continue
		}
		tableBlocks := (used*s.inodeSize + bs - 1) / bs
		if !onFS(itable, tableBlocks) || tableBlocks*bs > min(size, 64<<20) {
			continue
		}
		table := make([]byte, tableBlocks*bs)
		if _, err := r.ReadAt(table, itable*bs); err != nil {
			return nil, fmt.Errorf("read the inode table of group %d: %w", g, err)
		}
		for i := int64(0); i < used; i++ {
			if g*s.inodesPerGroup+i+1 < firstIno {
				continue
			}
			ino := table[i*s.inodeSize : (i+1)*s.inodeSize]
			if le.Uint16(ino[0:])&modeTypeMask != modeRegular || le.Uint16(ino[0x1A:]) == 0 || le.Uint32(ino[0x20:])&inodeFlagEx == 0 {
				continue // not a regular file in use, or not mapped by extents
			}
			files = append(files, recentFile{mtime: int64(le.Uint32(ino[0x10:])), root: ino[0x28 : 0x28+60]})
		}
	}
	// Most recently modified first; the budget goes to them, and only
	// their extent leaves are read.
	slices.SortStableFunc(files, func(a, b recentFile) int { return cmp.Compare(b.mtime, a.mtime) })
	l := &list{fsSize: s.blocks * bs, lim: lim}
	for _, f := range files {
		for _, e := range fileExtents(r, f.root, bs, onFS, &leaves) {
			if !l.add(e.Off, min(e.Len, lim.MaxBytes-l.bytes)) || l.bytes >= lim.MaxBytes {
				return merge(l.rs, lim), nil
			}
		}
	}
	return merge(l.rs, lim), nil
}

// fileExtents lists the written extents of the extent tree whose root is
// root (the inode's i_block), in filesystem bytes: a root's own leaves,
// or (depth 1) the leaves its index points to, while *leaves stays under
// maxLeafReads. Anything malformed ends the list there.
func fileExtents(r io.ReaderAt, root []byte, bs int64, onFS func(blk, n int64) bool, leaves *int) []blockdev.Range {
	le := binary.LittleEndian
	var out []blockdev.Range
	var walk func(node []byte, depth int)
	walk = func(node []byte, depth int) {
		if len(node) < 12 || le.Uint16(node[0:]) != extentMagic || int(le.Uint16(node[6:])) != depth {
			return
		}
		n := int(le.Uint16(node[2:]))
		if n > (len(node)-12)/12 {
			return
		}
		for i := range n {
			e := node[12+12*i : 24+12*i]
			if depth == 0 {
				l := int64(le.Uint16(e[4:]))
				start := int64(le.Uint16(e[6:]))<<32 | int64(le.Uint32(e[8:]))
				if l == 0 || l > uninitLen || !onFS(start, l) {
					continue // unwritten (zeros), or off the filesystem
				}
				out = append(out, blockdev.Range{Off: start * bs, Len: l * bs})
				continue
			}
			leaf := int64(le.Uint16(e[8:]))<<32 | int64(le.Uint32(e[4:]))
			if *leaves >= maxLeafReads || !onFS(leaf, 1) {
				return
			}
			*leaves++
			b := make([]byte, bs)
			if _, err := r.ReadAt(b, leaf*bs); err != nil {
				return
			}
			walk(b, depth-1)
		}
	}
	if len(root) >= 12 {
		if depth := int(le.Uint16(root[6:])); depth <= maxExtentDepth {
			walk(root, depth)
		}
	}
	return out
}
