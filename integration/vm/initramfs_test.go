package vm

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestArchiveIsNewc checks ferry's cpio writer against GNU cpio's reader.
func TestArchiveIsNewc(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("needs cpio: apt-get install cpio (scripts/packages.txt)")
	}
	a := newArchive()
	if err := a.file("etc/deep/x.txt", []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := a.file("init", []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	a.symlink("bin/sh", "busybox")
	a.node("dev/console", 0o020600, 5, 1)
	out := filepath.Join(t.TempDir(), "a.gz")
	if err := a.writeGzip(out); err != nil {
		t.Fatal(err)
	}
	list, err := exec.Command("sh", "-c", "gzip -dc "+out+" | cpio -itv --quiet").CombinedOutput()
	if err != nil {
		t.Fatalf("cpio cannot read the archive: %v\n%s", err, list)
	}
	for _, want := range []string{"etc/deep/x.txt", "bin/sh -> busybox", "crw-------", "-rwxr-xr-x", "drwxr-xr-x"} {
		if !strings.Contains(string(list), want) {
			t.Errorf("listing lacks %q:\n%s", want, list)
		}
	}
	dir := t.TempDir()
	cmd := exec.Command("sh", "-c", "gzip -dc "+out+" | cpio -id --quiet etc/deep/x.txt")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("extract: %v %s", err, out)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "etc/deep/x.txt")); err != nil || string(b) != "hello" {
		t.Fatalf("extracted %q %v", b, err)
	}
}

func TestSharedLibsOfADynamicBinary(t *testing.T) {
	bin, err := lookTool("ls")
	if err != nil {
		t.Skip("needs ls")
	}
	libs, err := sharedLibs(t.Context(), bin)
	if err != nil {
		t.Fatal(err)
	}
	var libc, loader bool
	for _, l := range libs {
		libc = libc || strings.Contains(l, "libc.so")
		loader = loader || strings.Contains(l, "ld-linux")
	}
	if !libc || !loader {
		t.Fatalf("ldd of %s: %v", bin, libs)
	}
}

// TestQueryPackages asks this machine's apt which kernel to use: the ABI is
// discovered, never pinned.
func TestQueryPackages(t *testing.T) {
	if _, err := exec.LookPath("apt-cache"); err != nil {
		t.Skip("needs apt-cache (a Debian machine)")
	}
	p, err := queryPackages(t.Context())
	if err != nil {
		t.Skipf("apt has no package lists here: %v", err)
	}
	if !strings.HasSuffix(p.abi, "-amd64") || p.version == "" || !strings.HasPrefix(p.kbuild, "linux-kbuild-") ||
		p.source != "linux-source-"+strings.TrimPrefix(p.kbuild, "linux-kbuild-") || !strings.HasSuffix(p.common, "-common") ||
		!strings.HasPrefix(p.compiler, "gcc-") {
		t.Fatalf("packages %+v", p)
	}
}

func TestCachedKernel(t *testing.T) {
	cache := t.TempDir()
	if cachedKernel(cache) != nil {
		t.Fatal("empty cache has a kernel")
	}
	dir := filepath.Join(cache, "kernel", "6.1.0-99-amd64_6.1.999-1")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if cachedKernel(cache) != nil {
		t.Fatal("a kernel without its ready stamp was offered")
	}
	if err := os.WriteFile(filepath.Join(dir, "ready"), []byte("6.1.0-99-amd64 6.1.999-1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	k := cachedKernel(cache)
	if k == nil || k.ABI != "6.1.0-99-amd64" || k.Version != "6.1.999-1" || k.Vmlinuz != filepath.Join(dir, "root", "boot", "vmlinuz-6.1.0-99-amd64") {
		t.Fatalf("%+v", k)
	}
}
