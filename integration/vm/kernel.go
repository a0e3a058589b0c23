// Package vm boots Debian's own kernel under qemu so that ferry's kernel data
// path (dm-clone, dm-crypt, open-iscsi) can be tested on machines whose kernel
// has none of it. It fetches the kernel packages for the ABI that
// linux-image-amd64 currently names, builds dm-clone.ko out of tree (Debian
// does not build it), packs an initramfs with the tools and modules the tests
// need, boots it and turns the guest's verdict into a Go error.
//
// Everything downloaded or built lives in a cache outside the checkout
// (FERRY_VM_CACHE, default /var/cache/ferry-vm), so only the first run pays
// for the ~224 MB download.
package vm

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// DefaultCacheDir holds downloads and built artefacts between runs.
const DefaultCacheDir = "/var/cache/ferry-vm"

// CacheDir is FERRY_VM_CACHE when set, DefaultCacheDir otherwise.
func CacheDir() string {
	if d := os.Getenv("FERRY_VM_CACHE"); d != "" {
		return d
	}
	return DefaultCacheDir
}

// Kernel is one Debian kernel ABI unpacked for booting, with dm-clone.ko
// added to its module tree and modules.dep regenerated.
type Kernel struct {
	ABI     string // e.g. 6.1.0-57-amd64, as named by linux-image-amd64
	Version string // Debian package version of linux-image-<ABI>
	Vmlinuz string // path of the bootable image (bzImage)
	// Vmlinux is the uncompressed ELF image qemu boots directly through PVH,
	// skipping the firmware and the xz decompression that take ~6 s under
	// TCG; empty when it could not be extracted (Vmlinuz is booted then).
	Vmlinux string
	Root    string // directory holding lib/modules/<ABI>
}

// ModulesDir is lib/modules/<ABI> inside Root.
func (k *Kernel) ModulesDir() string { return filepath.Join(k.Root, "lib", "modules", k.ABI) }

// kernelPackages are the Debian packages one ABI needs.
type kernelPackages struct {
	abi, version                   string
	image, headers, common, kbuild string
	source                         string
	compiler                       string // e.g. gcc-12: the kernel's compiler, which kbuild calls by name
}

var (
	abiDepRe  = regexp.MustCompile(`Depends:\s*linux-image-(\S+)`)
	versionRe = regexp.MustCompile(`(?m)^Version:\s*(\S+)`)
	dependsRe = regexp.MustCompile(`(?m)^Depends:\s*(.*)$`)
)

// PrepareKernel returns the kernel for the ABI linux-image-amd64 names today,
// downloading and building what the cache lacks. The ABI is discovered at
// run time (Debian's security uploads replace old kernel packages), never
// pinned. It holds a lock on the cache so parallel callers build once.
func PrepareKernel(ctx context.Context, log zerolog.Logger, cache string) (*Kernel, error) {
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, fmt.Errorf("vm: creating cache %s: %w", cache, err)
	}
	unlock, err := lockFile(filepath.Join(cache, "lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()

	pkgs, err := discoverPackages(ctx, log)
	if err != nil {
		// Offline, or apt broken: a kernel built earlier still boots.
		if k := cachedKernel(cache); k != nil {
			log.Warn().Err(err).Str("abi", k.ABI).Msg("cannot ask apt for today's kernel; using the cached one")
			k.Vmlinux = extractVmlinux(ctx, log, k.Vmlinuz, filepath.Join(filepath.Dir(k.Root), "vmlinux"))
			return k, nil
		}
		return nil, err
	}
	dir := filepath.Join(cache, "kernel", pkgs.abi+"_"+pkgs.version)
	k := &Kernel{
		ABI:     pkgs.abi,
		Version: pkgs.version,
		Vmlinuz: filepath.Join(dir, "root", "boot", "vmlinuz-"+pkgs.abi),
		Root:    filepath.Join(dir, "root"),
	}
	stamp := filepath.Join(dir, "ready")
	if _, err := os.Stat(stamp); err == nil {
		log.Debug().Str("abi", k.ABI).Str("dir", dir).Msg("kernel cached")
		k.Vmlinux = extractVmlinux(ctx, log, k.Vmlinuz, filepath.Join(dir, "vmlinux"))
		return k, nil
	}
	start := time.Now()
	log.Info().Str("abi", k.ABI).Str("version", k.Version).Str("dir", dir).Msg("preparing kernel (first run: download ~224 MB, build dm-clone.ko)")
	if err := os.RemoveAll(dir); err != nil {
		return nil, fmt.Errorf("vm: clearing %s: %w", dir, err)
	}
	if pkgs.compiler != "" {
		if _, err := exec.LookPath(pkgs.compiler); err != nil {
			return nil, fmt.Errorf("vm: kernel %s was built with %s, which is not installed: apt-get install %s", k.ABI, pkgs.compiler, pkgs.compiler)
		}
	}
	debs, err := download(ctx, log, filepath.Join(cache, "debs"), pkgs)
	if err != nil {
		return nil, err
	}
	if err := unpackKernel(ctx, dir, debs, pkgs); err != nil {
		return nil, err
	}
	ko, err := buildDMClone(ctx, dir, debs, pkgs)
	if err != nil {
		return nil, err
	}
	extra := filepath.Join(k.ModulesDir(), "extra")
	if err := os.MkdirAll(extra, 0o755); err != nil {
		return nil, err
	}
	if err := copyFile(ko, filepath.Join(extra, "dm-clone.ko")); err != nil {
		return nil, err
	}
	if out, err := run(ctx, "", "depmod", "-b", k.Root, k.ABI); err != nil {
		return nil, fmt.Errorf("vm: depmod for %s: %w\n%s", k.ABI, err, out)
	}
	// The packages, headers and sources were only needed to build
	// dm-clone.ko: dropping them keeps the cache at ~470 MB.
	for _, d := range []string{"headers", "src", "dm-clone"} {
		_ = os.RemoveAll(filepath.Join(dir, d))
	}
	for _, f := range debs {
		_ = os.Remove(f)
	}
	k.Vmlinux = extractVmlinux(ctx, log, k.Vmlinuz, filepath.Join(dir, "vmlinux"))
	if err := os.WriteFile(stamp, []byte(k.ABI+" "+k.Version+"\n"), 0o644); err != nil {
		return nil, err
	}
	log.Info().Str("abi", k.ABI).Dur("took", time.Since(start)).Msg("kernel ready")
	// Kernels of ABIs Debian has since replaced are never booted again.
	others, _ := filepath.Glob(filepath.Join(cache, "kernel", "*"))
	for _, o := range others {
		if o != dir {
			log.Info().Str("dir", o).Msg("removing a superseded kernel from the cache")
			_ = os.RemoveAll(o)
		}
	}
	return k, nil
}

// cachedKernel is the kernel a previous run finished building, if any.
func cachedKernel(cache string) *Kernel {
	stamps, _ := filepath.Glob(filepath.Join(cache, "kernel", "*", "ready"))
	if len(stamps) != 1 {
		return nil
	}
	f := strings.Fields(readString(stamps[0]))
	if len(f) != 2 {
		return nil
	}
	dir := filepath.Dir(stamps[0])
	return &Kernel{ABI: f[0], Version: f[1], Root: filepath.Join(dir, "root"),
		Vmlinuz: filepath.Join(dir, "root", "boot", "vmlinuz-"+f[0])}
}

func readString(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

// extractVmlinux writes the ELF kernel inside a bzImage to out (once) and
// returns its path, or "" when the image is not the xz-compressed kind this
// knows how to unpack; booting then falls back to the bzImage.
func extractVmlinux(ctx context.Context, log zerolog.Logger, bzImage, out string) string {
	if fi, err := os.Stat(out); err == nil && fi.Size() > 0 {
		return out
	}
	img, err := os.ReadFile(bzImage)
	if err != nil {
		log.Warn().Err(err).Msg("reading the kernel image; booting the bzImage")
		return ""
	}
	i := bytes.Index(img, []byte("\xfd7zXZ\x00"))
	if i < 0 {
		log.Info().Msg("kernel image is not xz-compressed; booting the bzImage (slower under TCG)")
		return ""
	}
	cmd := exec.CommandContext(ctx, "xz", "-dc", "--single-stream")
	cmd.Stdin = bytes.NewReader(img[i:])
	elf, err := cmd.Output()
	if err != nil || !bytes.HasPrefix(elf, []byte("\x7fELF")) {
		log.Warn().Err(err).Msg("could not extract vmlinux; booting the bzImage")
		return ""
	}
	if err := os.WriteFile(out+".tmp", elf, 0o644); err != nil {
		return ""
	}
	if err := os.Rename(out+".tmp", out); err != nil {
		return ""
	}
	return out
}

// discoverPackages asks apt which kernel linux-image-amd64 depends on today
// and which header, kbuild and source packages go with it. Missing package
// lists get one `apt-get update`.
func discoverPackages(ctx context.Context, log zerolog.Logger) (kernelPackages, error) {
	p, err := queryPackages(ctx)
	if err == nil {
		return p, nil
	}
	log.Info().Err(err).Msg("apt knows no kernel yet; running apt-get update once")
	if out, uerr := run(ctx, "", "apt-get", "update", "-qq"); uerr != nil {
		return p, fmt.Errorf("vm: apt-get update failed (%v): %s; and %w", uerr, tail(out), err)
	}
	return queryPackages(ctx)
}

func queryPackages(ctx context.Context) (kernelPackages, error) {
	var p kernelPackages
	out, err := run(ctx, "", "apt-cache", "depends", "linux-image-amd64")
	m := abiDepRe.FindSubmatch(out)
	if err != nil || m == nil {
		return p, fmt.Errorf("vm: cannot discover Debian's kernel ABI: `apt-cache depends linux-image-amd64` names no linux-image-<abi> (%v); run apt-get update on a Debian machine", err)
	}
	p.abi = string(m[1])
	p.image = "linux-image-" + p.abi
	p.headers = "linux-headers-" + p.abi
	out, err = run(ctx, "", "apt-cache", "show", "--no-all-versions", p.image)
	v := versionRe.FindSubmatch(out)
	if err != nil || v == nil {
		return p, fmt.Errorf("vm: no version for %s in apt (%v): run apt-get update", p.image, err)
	}
	p.version = string(v[1])
	out, err = run(ctx, "", "apt-cache", "show", p.headers+"="+p.version)
	d := dependsRe.FindSubmatch(out)
	if err != nil || d == nil {
		return p, fmt.Errorf("vm: %s=%s not in apt (%v): run apt-get update", p.headers, p.version, err)
	}
	for _, dep := range strings.Split(string(d[1]), ",") {
		name := strings.Fields(dep)
		if len(name) == 0 {
			continue
		}
		switch {
		case strings.HasPrefix(name[0], "linux-headers-") && strings.HasSuffix(name[0], "-common"):
			p.common = name[0]
		case strings.HasPrefix(name[0], "linux-kbuild-"):
			p.kbuild = name[0]
		case strings.HasPrefix(name[0], "linux-compiler-gcc-"):
			// linux-compiler-gcc-12-x86 -> gcc-12
			v := strings.TrimPrefix(name[0], "linux-compiler-gcc-")
			if i := strings.IndexByte(v, '-'); i > 0 {
				p.compiler = "gcc-" + v[:i]
			}
		}
	}
	if p.common == "" || p.kbuild == "" {
		return p, fmt.Errorf("vm: %s depends on no -common headers or linux-kbuild package (%q)", p.headers, d[1])
	}
	// linux-kbuild-6.1 goes with linux-source-6.1.
	p.source = "linux-source-" + strings.TrimPrefix(p.kbuild, "linux-kbuild-")
	return p, nil
}

// download fetches the five packages of one ABI at exactly its version into
// dir (kept between runs), returning package name → .deb path.
func download(ctx context.Context, log zerolog.Logger, dir string, p kernelPackages) (map[string]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	names := []string{p.image, p.headers, p.common, p.kbuild, p.source}
	debs := map[string]string{}
	var missing []string
	// Headers must match the kernel exactly; dm-clone's sources need not (it
	// changes rarely, and vermagic comes from the headers), so the source
	// package is whatever version apt offers.
	want := func(n string) (version, arg string) {
		if n == p.source {
			return "*", n
		}
		return p.version, n + "=" + p.version
	}
	for _, n := range names {
		v, arg := want(n)
		if f := findDeb(dir, n, v); f != "" {
			debs[n] = f
		} else {
			missing = append(missing, arg)
		}
	}
	if len(missing) > 0 {
		log.Info().Strs("packages", missing).Msg("downloading")
		out, err := run(ctx, dir, "apt-get", append([]string{"download", "-q"}, missing...)...)
		if err != nil {
			// Stale lists name files the archive has replaced: refresh once.
			log.Info().Err(err).Msg("download failed; running apt-get update and retrying")
			if uout, uerr := run(ctx, "", "apt-get", "update", "-qq"); uerr != nil {
				return nil, fmt.Errorf("vm: downloading %v failed: %s; apt-get update failed too: %s", missing, tail(out), tail(uout))
			}
			if out, err = run(ctx, dir, "apt-get", append([]string{"download", "-q"}, missing...)...); err != nil {
				return nil, fmt.Errorf("vm: downloading the kernel packages %v failed (check the machine can reach Debian's archive): %w\n%s", missing, err, tail(out))
			}
		}
		for _, n := range names {
			if debs[n] == "" {
				v, _ := want(n)
				if debs[n] = findDeb(dir, n, v); debs[n] == "" {
					return nil, fmt.Errorf("vm: apt-get download reported success but no %s_%s .deb is in %s", n, v, dir)
				}
			}
		}
	}
	return debs, nil
}

// findDeb finds name_version_*.deb (apt escapes an epoch's colon as %3a);
// version "*" takes any.
func findDeb(dir, name, version string) string {
	v := strings.ReplaceAll(version, ":", "%3a")
	m, _ := filepath.Glob(filepath.Join(dir, name+"_"+v+"_*.deb"))
	if len(m) == 0 {
		return ""
	}
	return m[0]
}

// unpackKernel unpacks the image and the three header packages into dir.
func unpackKernel(ctx context.Context, dir string, debs map[string]string, p kernelPackages) error {
	root := filepath.Join(dir, "root")
	hdr := filepath.Join(dir, "headers")
	for _, d := range []string{root, hdr} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if out, err := run(ctx, "", "dpkg-deb", "-x", debs[p.image], root); err != nil {
		return fmt.Errorf("vm: unpacking %s: %w\n%s", debs[p.image], err, tail(out))
	}
	for _, n := range []string{p.headers, p.common, p.kbuild} {
		if out, err := run(ctx, "", "dpkg-deb", "-x", debs[n], hdr); err != nil {
			return fmt.Errorf("vm: unpacking %s: %w\n%s", debs[n], err, tail(out))
		}
	}
	// The ABI's Makefile includes the -common tree by its installed absolute
	// path; point it at the unpacked copy instead of installing anything.
	mk := filepath.Join(hdr, "usr", "src", p.headers, "Makefile")
	common := filepath.Join(hdr, "usr", "src", p.common, "Makefile")
	if err := os.WriteFile(mk, []byte("include "+common+"\n"), 0o644); err != nil {
		return fmt.Errorf("vm: rewriting %s: %w", mk, err)
	}
	return nil
}

// buildDMClone extracts dm-clone's sources (and drivers/md's headers) from
// the linux-source tarball, streaming, and builds the module against the
// unpacked headers. It returns the path of dm-clone.ko.
func buildDMClone(ctx context.Context, dir string, debs map[string]string, p kernelPackages) (string, error) {
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		return "", err
	}
	// dpkg-deb | tar -xO <inner tarball> | xz -d | tar -x <only drivers/md>:
	// the 1.2 GB source tree never touches the disk.
	ver := strings.TrimPrefix(p.source, "linux-source-")
	inner := "./usr/src/linux-source-" + ver + ".tar.xz"
	top := "linux-source-" + ver + "/drivers/md/"
	script := `set -o pipefail; dpkg-deb --fsys-tarfile "$1" | tar -xO "$2" | xz -dc -T0 | tar -x -C "$3" --wildcards "$4dm-clone*" "$4*.h"`
	if out, err := run(ctx, "", "bash", "-c", script, "extract", debs[p.source], inner, src, top); err != nil {
		return "", fmt.Errorf("vm: extracting drivers/md from %s: %w\n%s", debs[p.source], err, tail(out))
	}
	md := filepath.Join(src, top)
	build := filepath.Join(dir, "dm-clone")
	if err := os.MkdirAll(build, 0o755); err != nil {
		return "", err
	}
	cfiles, _ := filepath.Glob(filepath.Join(md, "dm-clone*"))
	if len(cfiles) < 3 {
		return "", fmt.Errorf("vm: %s has no dm-clone sources (found %v)", debs[p.source], cfiles)
	}
	for _, f := range cfiles {
		if err := copyFile(f, filepath.Join(build, filepath.Base(f))); err != nil {
			return "", err
		}
	}
	kbuild := "obj-m := dm-clone.o\ndm-clone-y := dm-clone-target.o dm-clone-metadata.o\nccflags-y += -I" + md + "\n"
	if err := os.WriteFile(filepath.Join(build, "Kbuild"), []byte(kbuild), 0o644); err != nil {
		return "", err
	}
	hdr := filepath.Join(dir, "headers", "usr", "src", p.headers)
	if out, err := run(ctx, "", "make", "-C", hdr, "M="+build, "modules"); err != nil {
		return "", fmt.Errorf("vm: building dm-clone.ko for %s (needs gcc and make matching the kernel's compiler): %w\n%s", p.abi, err, tail(out))
	}
	ko := filepath.Join(build, "dm-clone.ko")
	if _, err := os.Stat(ko); err != nil {
		return "", fmt.Errorf("vm: kbuild finished but %s is missing: %w", ko, err)
	}
	return ko, nil
}

// run runs a command, returning its combined output.
func run(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive")
	var buf bytes.Buffer
	cmd.Stdout = &buf
	cmd.Stderr = &buf
	err := cmd.Run()
	return buf.Bytes(), err
}

// tail keeps the last lines of a command's output for an error message.
func tail(out []byte) string {
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return strings.Join(lines, "\n")
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		return err
	}
	out, err := os.OpenFile(to, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, fi.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copying %s to %s: %w", from, to, err)
	}
	return out.Close()
}

// lockFile takes an exclusive flock, so two test processes never build into
// the same cache at once.
func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("vm: opening cache lock %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("vm: locking %s: %w", path, err)
	}
	return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
}

// moduleLoadOrder lists the .ko files (relative to the module tree's root)
// that load the named modules, dependencies first, each once. Modules built
// into the kernel are skipped.
func moduleLoadOrder(ctx context.Context, k *Kernel, names []string) ([]string, error) {
	var order []string
	seen := map[string]bool{}
	for _, n := range names {
		out, err := run(ctx, "", "modprobe", "-d", k.Root, "-S", k.ABI, "--show-depends", n)
		if err != nil {
			return nil, fmt.Errorf("vm: module %s for %s: %w\n%s", n, k.ABI, err, tail(out))
		}
		sc := bufio.NewScanner(bytes.NewReader(out))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) < 2 || f[0] != "insmod" {
				continue // "builtin x"
			}
			rel, err := filepath.Rel(k.Root, f[1])
			if err != nil || strings.HasPrefix(rel, "..") {
				return nil, fmt.Errorf("vm: modprobe named %s outside %s", f[1], k.Root)
			}
			if !seen[rel] {
				seen[rel] = true
				order = append(order, rel)
			}
		}
	}
	if len(order) == 0 {
		return nil, errors.New("vm: no modules to load")
	}
	return order, nil
}

// sortedKeys is a small helper for deterministic archive order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
