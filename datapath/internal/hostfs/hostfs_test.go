package hostfs

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/luks"
)

func TestMountedAt(t *testing.T) {
	if src, ok := MountedAt("/proc"); !ok || src == "" {
		t.Fatalf("/proc not seen as a mount point (%q, %v)", src, ok)
	}
	if _, ok := MountedAt(t.TempDir()); ok {
		t.Fatal("a plain directory seen as a mount point")
	}
}

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestDigHolesKeepsContentAndFreesZeros(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	want := make([]byte, 8<<20)
	for _, at := range []int{100, 3 << 20, 8<<20 - 1} { // a few non-zero bytes, one in the last block
		want[at] = 0xa5
	}
	if err := os.WriteFile(p, want, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := DigHoles(p, 0, 8<<20); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("content changed")
	}
	if a := allocated(t, p); a > 64<<10 {
		t.Fatalf("%d bytes still allocated, want the three non-zero blocks only", a)
	}
}

func TestMkfsExt4WritesOnlyMetadata(t *testing.T) {
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("needs mkfs.ext4 (e2fsprogs)")
	}
	p := filepath.Join(t.TempDir(), "img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(100 << 30); err != nil {
		t.Skipf("the temp dir's filesystem takes no 100 GiB sparse file: %v", err)
	}
	f.Close()
	if err := MkfsExt4(context.Background(), p, "t"); err != nil {
		t.Fatal(err)
	}
	// The journal (512 MiB here) and the inode tables stay holes.
	if a := allocated(t, p); a > 4<<20 {
		t.Fatalf("mkfs wrote %d MiB of a 100 GiB volume, want under 4", a>>20)
	}
	out, err := exec.Command("dumpe2fs", "-h", p).CombinedOutput()
	if err != nil {
		t.Fatalf("dumpe2fs: %v: %s", err, out)
	}
	if !strings.Contains(string(out), "has_journal") {
		t.Fatalf("no journal:\n%s", out)
	}
}

// A small volume (mke2fs's "small" type, under 512 MiB) still gets 4 KiB
// blocks: a 1 KiB block would be a part of a LUKS2 sector.
func TestMkfsExt4SmallVolumeHasWholeSectorBlocks(t *testing.T) {
	testenv.Tools(t, "apt-get install e2fsprogs", "mkfs.ext4", "dumpe2fs")
	p := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 64<<20); err != nil {
		t.Fatal(err)
	}
	if err := MkfsExt4(context.Background(), p, "t"); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("dumpe2fs", "-h", p).CombinedOutput()
	if err != nil {
		t.Fatalf("dumpe2fs: %v: %s", err, out)
	}
	if !regexp.MustCompile(`(?m)^Block size:\s+4096$`).Match(out) {
		t.Fatalf("a 64 MiB volume's filesystem does not have 4 KiB blocks:\n%s", out)
	}
}

func TestSparsifyHeaderKeepsTheKeyslot(t *testing.T) {
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Skip("needs cryptsetup")
	}
	dir := t.TempDir()
	p, kf := filepath.Join(dir, "vol"), filepath.Join(dir, "key")
	if err := os.WriteFile(kf, []byte("correct horse"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(64 << 20)
	f.Close()
	if err := luks.Format(context.Background(), p, kf, luks.FormatOptions{FastKDF: true}); err != nil {
		t.Fatal(err)
	}
	before := allocated(t, p)
	if err := SparsifyHeader(p); err != nil {
		t.Fatal(err)
	}
	if a := allocated(t, p); a > 1<<20 || a >= before {
		t.Fatalf("header holds %d KiB after (%d KiB before), want under 1 MiB", a>>10, before>>10)
	}
	// The passphrase still opens the keyslot, and the header still parses.
	if out, err := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file", kf, p).CombinedOutput(); err != nil {
		t.Fatalf("the keyslot no longer opens: %v: %s", err, out)
	}
	if _, err := ReadLayout(p, "vol"); err != nil {
		t.Fatal(err)
	}
}
