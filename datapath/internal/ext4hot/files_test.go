package ext4hot

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// writeFile puts a file made of count chunks of chunk bytes, each after a
// hole of gap bytes (one extent per chunk), into the filesystem as name
// with modification time mtime (debugfs's YYYYMMDD).
func writeFile(t *testing.T, f *os.File, name string, count, chunk, gap int64, mtime string) {
	t.Helper()
	src := filepath.Join(t.TempDir(), name)
	w, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	for i := range count {
		if _, err := w.WriteAt([]byte(strings.Repeat("x", int(chunk))), i*(chunk+gap)); err != nil {
			t.Fatal(err)
		}
	}
	w.Close()
	debugfsW(t, f, "write "+src+" "+name)
	debugfsW(t, f, "set_inode_field "+name+" mtime "+mtime)
}

func debugfsW(t *testing.T, f *os.File, req string) {
	t.Helper()
	if out, err := exec.Command("debugfs", "-w", "-R", req, f.Name()).CombinedOutput(); err != nil {
		t.Fatalf("debugfs %s: %v: %s", req, err, out)
	}
}

// dataBlocks is what debugfs says holds name's data (its extent tree's
// own blocks left out).
func dataBlocks(t *testing.T, f *os.File, name string) []int64 {
	t.Helper()
	stat := debugfs(t, f, "stat "+name)
	var out []int64
	for _, m := range regexp.MustCompile(`\(\d+(?:-\d+)?\):(\d+)(?:-(\d+))?`).FindAllStringSubmatch(stat, -1) {
		a, _ := strconv.ParseInt(m[1], 10, 64)
		b := a
		if m[2] != "" {
			b, _ = strconv.ParseInt(m[2], 10, 64)
		}
		for blk := a; blk <= b; blk++ {
			out = append(out, blk)
		}
	}
	if len(out) == 0 {
		t.Fatalf("no data blocks for %s in %s", name, stat)
	}
	return out
}

// The list holds the data of the files most recently modified, first
// (those of a file whose extents need a leaf read too), as debugfs
// reports it, and keeps its limits.
func TestRecentFilesMatchDebugfs(t *testing.T) {
	const size = 1 << 30
	f := mkfs(t, size)
	writeFile(t, f, "old", 2, 16<<10, 0, "20200101")
	writeFile(t, f, "frag", 12, 8<<10, 64<<10, "20250101") // more extents than the inode holds
	bs, _ := strconv.ParseInt(regexp.MustCompile(`Block size:\s+(\d+)`).FindStringSubmatch(debugfs(t, f, "stats"))[1], 10, 64)
	if !strings.Contains(debugfs(t, f, "stat frag"), "(ETB0)") {
		t.Fatal("the fragmented file got no extent leaf: the test does not test leaf reads")
	}
	rs, err := RecentFiles(f, size, RecentLimits)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"old", "frag"} {
		for _, blk := range dataBlocks(t, f, name) {
			if !covered(rs, blk*bs, bs) {
				t.Fatalf("block %d of %s is not listed: %v", blk, name, rs)
			}
		}
	}
	// Room for one file: the newer one.
	fragBytes := int64(len(dataBlocks(t, f, "frag"))) * bs
	rs, err = RecentFiles(f, size, Limits{MaxBytes: fragBytes, MaxRanges: 256})
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, r := range rs {
		total += r.Len
	}
	if total > fragBytes {
		t.Fatalf("%d bytes listed, limit %d", total, fragBytes)
	}
	for _, blk := range dataBlocks(t, f, "frag") {
		if !covered(rs, blk*bs, bs) {
			t.Fatalf("the newest file's block %d is not listed first: %v", blk, rs)
		}
	}
	for _, blk := range dataBlocks(t, f, "old") {
		if covered(rs, blk*bs, bs) {
			t.Fatalf("the older file's block %d is listed past the limit: %v", blk, rs)
		}
	}
}
