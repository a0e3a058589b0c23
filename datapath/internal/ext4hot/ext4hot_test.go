package ext4hot

import (
	"encoding/binary"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// mkfs makes an ext4 filesystem of size bytes in a sparse file with the
// options ferry's volumes get, plus a few files, and returns the file.
func mkfs(t *testing.T, size int64) *os.File {
	t.Helper()
	testenv.Tools(t, "install e2fsprogs (scripts/deps.sh)", "mkfs.ext4", "debugfs")
	path := filepath.Join(t.TempDir(), "fs")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-O", "^resize_inode", "-E",
		"nodiscard,lazy_itable_init=1,lazy_journal_init=1", path).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	if out, err := exec.Command("debugfs", "-w", "-R", "mkdir m1", path).CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v: %s", err, out)
	}
	return f
}

func debugfs(t *testing.T, f *os.File, req string) string {
	t.Helper()
	// Its banner goes to stderr; the answer alone to stdout.
	out, err := exec.Command("debugfs", "-R", req, f.Name()).Output()
	if err != nil {
		t.Fatalf("debugfs %s: %v", req, err)
	}
	return string(out)
}

func covered(rs []blockdev.Range, off, n int64) bool {
	for _, r := range rs {
		if off >= r.Off && off+n <= r.End() {
			return true
		}
	}
	return false
}

// The list holds what mount reads (superblock, descriptors, the bitmaps
// of the first flex group's groups in use, the journal's superblock) as
// debugfs reports them, and nothing of the other flex groups.
func TestRangesMatchDebugfs(t *testing.T) {
	for _, size := range []int64{256 << 20, 8 << 30} {
		f := mkfs(t, size)
		rs, err := Ranges(f, size, DefaultLimits)
		if err != nil {
			t.Fatal(err)
		}
		var total int64
		for i, r := range rs {
			if r.Off < 0 || r.End() > size || (i > 0 && r.Off <= rs[i-1].End()) {
				t.Fatalf("range %d %+v out of the device or not sorted and merged: %v", i, r, rs)
			}
			total += r.Len
		}
		stats := debugfs(t, f, "stats")
		bs, _ := strconv.ParseInt(regexp.MustCompile(`Block size:\s+(\d+)`).FindStringSubmatch(stats)[1], 10, 64)
		if !covered(rs, 0, 2*bs) {
			t.Errorf("%d: the superblock and descriptors are not listed: %v", size, rs)
		}
		groups := regexp.MustCompile(`Group\s+(\d+): block bitmap at (\d+), inode bitmap at (\d+), inode table at (\d+)\n\s+(\d+) free (?:blocks|clusters), (\d+) free inodes, (\d+) used directories(?:, (\d+) unused inodes)?\n\s+\[([^\]]*)\]`).FindAllStringSubmatch(stats, -1)
		if len(groups) == 0 {
			t.Fatalf("no groups in debugfs stats:\n%s", stats)
		}
		flex := int64(1)
		if m := regexp.MustCompile(`Flex block group size:\s+(\d+)`).FindStringSubmatch(stats); m != nil {
			flex, _ = strconv.ParseInt(m[1], 10, 64)
		}
		others := 0
		for _, g := range groups {
			flags := g[9]
			if n, _ := strconv.ParseInt(g[1], 10, 64); n >= flex {
				// Other flex groups are left to fstrim and the allocator.
				if bb, _ := strconv.ParseInt(g[2], 10, 64); covered(rs, bb*bs, bs) {
					t.Errorf("%d: group %d's block bitmap (block %d) is listed; only the first flex group's are", size, n, bb)
				}
				others++
				continue
			}
			bb, _ := strconv.ParseInt(g[2], 10, 64)
			ib, _ := strconv.ParseInt(g[3], 10, 64)
			if !regexp.MustCompile(`Block not init`).MatchString(flags) && !covered(rs, bb*bs, bs) {
				t.Errorf("%d: group %s's block bitmap (block %d) is not listed", size, g[1], bb)
			}
			if !regexp.MustCompile(`Inode not init`).MatchString(flags) && !covered(rs, ib*bs, bs) {
				t.Errorf("%d: group %s's inode bitmap (block %d) is not listed", size, g[1], ib)
			}
		}
		if others == 0 {
			t.Fatalf("%d: one flex group only: the test shows nothing about the others", size)
		}
		jb, err := strconv.ParseInt(regexp.MustCompile(`\d+`).FindString(debugfs(t, f, "bmap <8> 0")), 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		if !covered(rs, jb*bs, bs) {
			t.Errorf("%d: the journal's superblock (block %d) is not listed: %v", size, jb, rs)
		}
		magic := make([]byte, 4)
		f.ReadAt(magic, jb*bs)
		if binary.BigEndian.Uint32(magic) != 0xC03B3998 {
			t.Errorf("%d: block %d holds no journal superblock", size, jb)
		}
		// The point is to fetch little: a few blocks per group in use.
		if total > 4<<20 {
			t.Errorf("%d: %d bytes listed for a fresh filesystem", size, total)
		}
		t.Logf("%d bytes: %d ranges, %d bytes", size, len(rs), total)
	}
}

// Limits cap the list however large the filesystem says it is.
func TestRangesLimits(t *testing.T) {
	f := mkfs(t, 1<<30)
	rs, err := Ranges(f, 1<<30, Limits{MaxBytes: 8192, MaxRanges: 1})
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) > 1 || (len(rs) == 1 && rs[0].Len > 8192) {
		t.Fatalf("limits not kept: %v", rs)
	}
}

// A superblock pointing past the device, or not ext4 at all, is refused
// with nothing listed.
func TestRangesHostileSuperblock(t *testing.T) {
	f := mkfs(t, 64<<20)
	img := make([]byte, 64<<20)
	if _, err := f.ReadAt(img, 0); err != nil {
		t.Fatal(err)
	}
	cases := map[string]func(b []byte){
		"not ext4":           func(b []byte) { b[sbOffset+0x38] = 0 },
		"more blocks":        func(b []byte) { binary.LittleEndian.PutUint32(b[sbOffset+0x4:], 1<<31) },
		"huge block size":    func(b []byte) { binary.LittleEndian.PutUint32(b[sbOffset+0x18:], 30) },
		"zero per group":     func(b []byte) { binary.LittleEndian.PutUint32(b[sbOffset+0x20:], 0) },
		"odd inode size":     func(b []byte) { binary.LittleEndian.PutUint16(b[sbOffset+0x58:], 300) },
		"first data too far": func(b []byte) { binary.LittleEndian.PutUint32(b[sbOffset+0x14:], 1<<30) },
	}
	for name, spoil := range cases {
		b := append([]byte(nil), img...)
		spoil(b)
		rs, err := Ranges(byteReader(b), int64(len(b)), DefaultLimits)
		if err == nil || rs != nil {
			t.Errorf("%s: accepted: %v, %v", name, rs, err)
		}
	}
	// Descriptors pointing anywhere: only what lies on the device is listed.
	b := append([]byte(nil), img...)
	gdt := b[4096:]
	binary.LittleEndian.PutUint32(gdt[0:], 0xFFFFFFF0)
	binary.LittleEndian.PutUint16(gdt[0x12:], 0)
	rs, err := Ranges(byteReader(b), int64(len(b)), DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		if r.Off < 0 || r.End() > int64(len(b)) {
			t.Fatalf("range %+v outside the device", r)
		}
	}
}

type byteReader []byte

func (b byteReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(b)) {
		return 0, blockdev.ErrOutOfRange
	}
	n := copy(p, b[off:])
	if n < len(p) {
		return n, blockdev.ErrOutOfRange
	}
	return n, nil
}

// FuzzRanges: whatever the device holds, both parses (Ranges and
// RecentFiles) end and list only ranges on the device, sorted and merged,
// within the limits.
func FuzzRanges(f *testing.F) {
	sb := make([]byte, 8192)
	le := binary.LittleEndian
	le.PutUint16(sb[sbOffset+0x38:], sbMagic)
	le.PutUint32(sb[sbOffset+0x4:], 2)
	le.PutUint32(sb[sbOffset+0x20:], 8192)
	le.PutUint32(sb[sbOffset+0x28:], 16)
	f.Add(sb)
	f.Fuzz(func(t *testing.T, img []byte) {
		lim := Limits{MaxBytes: 1 << 20, MaxRanges: 16}
		check(t, img, lim, Ranges)
		check(t, img, lim, RecentFiles)
	})
}

// check runs parse on img and fails on a range off the device, unmerged,
// or past lim.
func check(t *testing.T, img []byte, lim Limits, parse func(io.ReaderAt, int64, Limits) ([]blockdev.Range, error)) {
	{
		rs, err := parse(byteReader(img), int64(len(img)), lim)
		if err != nil {
			return
		}
		var total int64
		for i, r := range rs {
			if r.Len <= 0 || r.Off < 0 || r.End() > int64(len(img)) || (i > 0 && r.Off <= rs[i-1].End()) {
				t.Fatalf("range %d %+v: off the device or unmerged: %v", i, r, rs)
			}
			total += r.Len
		}
		if len(rs) > lim.MaxRanges || total > lim.MaxBytes {
			t.Fatalf("limits not kept: %d ranges, %d bytes", len(rs), total)
		}
	}
}
