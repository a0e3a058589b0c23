package vm

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferry-dev/ferry/internal/testenv"

	"github.com/rs/zerolog"
)

// TestArchiveIsNewc checks ferry's cpio writer against GNU cpio's reader.
func TestArchiveIsNewc(t *testing.T) {
	testenv.Tools(t, "apt-get install cpio (scripts/packages.txt)", "cpio")
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
	testenv.Require(t, "ls: apt-get install coreutils", err == nil)
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
	testenv.Tools(t, "a Debian machine", "apt-cache")
	p, err := queryPackages(t.Context())
	testenv.Require(t, fmt.Sprintf("apt package lists: apt-get update (%v)", err), err == nil)
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

// TestDownloadFailureIsClear uses a fake apt-get: a failed download must
// say which packages and what to check, after one apt-get update.
func TestDownloadFailureIsClear(t *testing.T) {
	bin := t.TempDir()
	calls := filepath.Join(bin, "calls")
	fake := "#!/bin/sh\necho \"$@\" >> " + calls + "\n" +
		"case \"$1\" in update) [ -f " + bin + "/update-fails ] && { echo 'E: network down'; exit 100; }; exit 0 ;; esac\n" +
		"echo \"E: Can't find a source to download version '6.1.999-1' of 'linux-image-6.1.0-99-amd64:amd64'\"; exit 100\n"
	if err := os.WriteFile(filepath.Join(bin, "apt-get"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	p := kernelPackages{abi: "6.1.0-99-amd64", version: "6.1.999-1", image: "linux-image-6.1.0-99-amd64",
		headers: "linux-headers-6.1.0-99-amd64", common: "linux-headers-6.1.0-99-common", kbuild: "linux-kbuild-6.1", source: "linux-source-6.1"}
	_, err := download(t.Context(), zerolog.Nop(), t.TempDir(), p)
	if err == nil || !strings.Contains(err.Error(), "downloading the kernel packages") ||
		!strings.Contains(err.Error(), "linux-image-6.1.0-99-amd64=6.1.999-1") || !strings.Contains(err.Error(), "Can't find a source") {
		t.Fatalf("unclear error: %v", err)
	}
	log := readString(calls)
	if strings.Count(log, "download") != 2 || strings.Count(log, "update") != 1 {
		t.Fatalf("want download, update, download; apt-get saw:\n%s", log)
	}
	// When even the update fails, both failures are named.
	if err := os.WriteFile(filepath.Join(bin, "update-fails"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = download(t.Context(), zerolog.Nop(), t.TempDir(), p)
	if err == nil || !strings.Contains(err.Error(), "apt-get update failed too") || !strings.Contains(err.Error(), "network down") {
		t.Fatalf("unclear error: %v", err)
	}
}

func TestFailureLines(t *testing.T) {
	out := "=== RUN   TestA\n--- PASS: TestA (0.01s)\n=== RUN   TestB\n    b_test.go:42: wrong size: 3\n        more detail\n--- FAIL: TestB (0.02s)\nnoise 1\nnoise 2\nnoise 3\nnoise 4\nFAIL\n"
	got := failureLines(out)
	for _, want := range []string{"b_test.go:42: wrong size: 3", "more detail", "--- FAIL: TestB", "--- last lines ---"} {
		if !strings.Contains(got, want) {
			t.Errorf("failureLines lacks %q:\n%s", want, got)
		}
	}
	if strings.Count(got, "--- PASS: TestA") != 1 { // only in the tail, not picked
		t.Errorf("failureLines picked a passing test:\n%s", got)
	}
}
