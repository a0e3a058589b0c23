package vm

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/rs/zerolog"
)

// GuestModules are loaded by the guest's init, dependencies first.
var GuestModules = []string{
	"loop", "dm-mod", "dm-crypt", "dm-clone", "iscsi_tcp", "sd_mod",
	"xts", "aesni_intel", "algif_skcipher", "algif_hash",
	"virtio_pci", "virtio_net", "9pnet_virtio", "9p",
	"ext4", "crc32c_generic", // the kernel-path migration's filesystem
	"fuse", // the userspace path's Extend cases
	"nbd",  // the per-layer path: the userspace clone served to dm-crypt
	// The agent-driven migration's worker namespace: veth, and the netlink
	// families the netlink library opens for every handle.
	"veth", "xfrm_user", "nfnetlink",
}

// GuestTools are the host's dynamic binaries copied into the guest at
// /usr/local/sbin, with the libraries they link. They sit before busybox's
// applets on PATH: busybox's losetup and blkdiscard lack options ferry uses.
var GuestTools = []string{"dmsetup", "cryptsetup", "losetup", "blkdiscard", "blockdev", "iscsiadm", "iscsid",
	"mkfs.ext4", "fstrim", "e2fsck", "resize2fs", "setpriv", "fusermount3", "fio",
	"cp"} // coreutils cp: a fork of a volume not served copies it with --sparse=always

// optionalGuestTools are copied when the host has them.
var optionalGuestTools = []string{}

//go:embed init.sh
var initScript []byte

// BuildInitramfs writes (or reuses from the cache) a gzip'd newc initramfs
// for k: busybox-static, GuestTools with their libraries (plus libgcc_s,
// without which argon2 luksFormat aborts), the modules of GuestModules and
// their dependencies, and init.sh as /init. It returns the file's path.
func BuildInitramfs(ctx context.Context, log zerolog.Logger, k *Kernel, cache string) (string, error) {
	tools := map[string]string{}
	for _, t := range append(append([]string{"busybox"}, GuestTools...), optionalGuestTools...) {
		p, err := lookTool(t)
		if err != nil {
			if contains(optionalGuestTools, t) {
				continue
			}
			return "", err
		}
		tools[t] = p
	}
	mods, err := moduleLoadOrder(ctx, k, GuestModules)
	if err != nil {
		return "", err
	}

	// The archive is a function of the kernel, the init script and the
	// host's tool binaries: hash those to reuse it on warm runs.
	h := sha256.New()
	fmt.Fprintf(h, "%s %s\n%s\n%s\n", k.ABI, k.Version, initScript, strings.Join(mods, " "))
	for _, t := range sortedKeys(tools) {
		fi, err := os.Stat(tools[t])
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s %s %d %d\n", t, tools[t], fi.Size(), fi.ModTime().UnixNano())
	}
	out := filepath.Join(cache, "initrd", "initrd-"+hex.EncodeToString(h.Sum(nil))[:16]+".gz")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	unlock, err := lockFile(filepath.Join(cache, "lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := os.Stat(out); err == nil {
		return out, nil // built while we waited for the lock
	}

	a := newArchive()
	for _, d := range []string{"bin", "sbin", "usr/bin", "usr/sbin", "usr/local/sbin", "usr/local/bin",
		"proc", "sys", "dev", "tmp", "run", "var", "etc/iscsi", "host", "root", "lib64"} {
		a.dir(d)
	}
	a.node("dev/console", 0o020600, 5, 1)
	a.node("dev/null", 0o020666, 1, 3)
	if err := a.file("init", initScript, 0o755); err != nil {
		return "", err
	}
	if err := a.hostFile("bin/busybox", tools["busybox"], 0o755); err != nil {
		return "", err
	}
	applets, err := exec.CommandContext(ctx, tools["busybox"], "--list").Output()
	if err != nil {
		return "", fmt.Errorf("vm: busybox --list: %w", err)
	}
	for _, ap := range strings.Fields(string(applets)) {
		if ap != "busybox" {
			a.symlink("bin/"+ap, "busybox")
		}
	}
	libs := map[string]bool{}
	for _, t := range sortedKeys(tools) {
		if t == "busybox" {
			continue
		}
		if err := a.hostFile("usr/local/sbin/"+t, tools[t], 0o755); err != nil {
			return "", err
		}
		deps, err := sharedLibs(ctx, tools[t])
		if err != nil {
			return "", err
		}
		for _, l := range deps {
			libs[l] = true
		}
	}
	if gcc := findLib("libgcc_s.so.1"); gcc != "" {
		libs[gcc] = true
	} else {
		return "", fmt.Errorf("vm: libgcc_s.so.1 not found on the host (cryptsetup's argon2 needs it): apt-get install libgcc-s1")
	}
	for _, l := range sortedKeys(libs) {
		if err := a.hostFile(strings.TrimPrefix(l, "/"), l, 0o755); err != nil {
			return "", err
		}
	}
	var order bytes.Buffer
	for _, m := range mods {
		if err := a.hostFile(m, filepath.Join(k.Root, m), 0o644); err != nil {
			return "", err
		}
		fmt.Fprintf(&order, "/%s\n", m)
	}
	if err := a.file("etc/ferry-modules", order.Bytes(), 0o644); err != nil {
		return "", err
	}
	if err := a.file("etc/iscsi/initiatorname.iscsi", []byte("InitiatorName=iqn.2024-01.dev.ferry:vm-guest\n"), 0o644); err != nil {
		return "", err
	}
	if err := a.file("etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644); err != nil {
		return "", err
	}
	if err := a.file("etc/group", []byte("root:x:0:\n"), 0o644); err != nil {
		return "", err
	}

	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", err
	}
	tmp := out + ".tmp"
	if err := a.writeGzip(tmp); err != nil {
		os.Remove(tmp)
		return "", err
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", err
	}
	log.Info().Str("initrd", out).Int("modules", len(mods)).Msg("initramfs built")
	// Older archives (another kernel, older tools or init script) are stale.
	old, _ := filepath.Glob(filepath.Join(cache, "initrd", "initrd-*.gz"))
	for _, o := range old {
		if o != out {
			_ = os.Remove(o)
		}
	}
	return out, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// lookTool finds a host binary, also in the sbin directories a non-root
// PATH may lack.
func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return filepath.EvalSymlinks(p)
	}
	for _, d := range []string{"/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			return filepath.EvalSymlinks(p)
		}
	}
	return "", fmt.Errorf("vm: %s is not installed on the host (the guest gets a copy): run scripts/deps.sh", name)
}

// sharedLibs lists the libraries (and the loader) a dynamic binary links,
// as ldd prints them.
func sharedLibs(ctx context.Context, bin string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", bin).CombinedOutput()
	if err != nil {
		if bytes.Contains(out, []byte("not a dynamic executable")) {
			return nil, nil
		}
		return nil, fmt.Errorf("vm: ldd %s: %w\n%s", bin, err, out)
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0]) // the loader
		case len(f) >= 2 && f[1] == "=>" && f[2] == "not":
			return nil, fmt.Errorf("vm: %s needs %s, which is missing on the host", bin, f[0])
		}
	}
	return libs, nil
}

func findLib(name string) string {
	for _, d := range []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"} {
		if _, err := os.Stat(filepath.Join(d, name)); err == nil {
			return filepath.Join(d, name)
		}
	}
	return ""
}

// archive collects cpio entries; parents are added implicitly.
type archive struct {
	entries map[string]entry
}

type entry struct {
	mode         uint32 // with type bits
	data         []byte
	major, minor uint32
}

const (
	sIFDIR = 0o040000
	sIFREG = 0o100000
	sIFLNK = 0o120000
)

func newArchive() *archive { return &archive{entries: map[string]entry{}} }

func (a *archive) dir(p string) {
	for p != "." && p != "/" && p != "" {
		if _, ok := a.entries[p]; !ok {
			a.entries[p] = entry{mode: sIFDIR | 0o755}
		}
		p = filepath.Dir(p)
	}
}

func (a *archive) file(p string, data []byte, perm uint32) error {
	a.dir(filepath.Dir(p))
	a.entries[p] = entry{mode: sIFREG | perm, data: data}
	return nil
}

// hostFile copies a host file's content (symlinks followed) to p.
func (a *archive) hostFile(p, host string, perm uint32) error {
	data, err := os.ReadFile(host)
	if err != nil {
		return fmt.Errorf("vm: reading %s for the initramfs: %w", host, err)
	}
	return a.file(p, data, perm)
}

func (a *archive) symlink(p, target string) {
	a.dir(filepath.Dir(p))
	a.entries[p] = entry{mode: sIFLNK | 0o777, data: []byte(target)}
}

func (a *archive) node(p string, mode, major, minor uint32) {
	a.dir(filepath.Dir(p))
	a.entries[p] = entry{mode: mode, major: major, minor: minor}
}

// writeGzip writes the entries as a gzip'd cpio "newc" archive, the format
// the kernel unpacks into its initial rootfs.
func (a *archive) writeGzip(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	zw, _ := gzip.NewWriterLevel(bw, gzip.BestSpeed)
	ino := uint32(1)
	for _, name := range sortedKeys(a.entries) {
		e := a.entries[name]
		if err := writeNewc(zw, name, e, ino); err != nil {
			f.Close()
			return err
		}
		ino++
	}
	if err := writeNewc(zw, "TRAILER!!!", entry{}, 0); err != nil {
		f.Close()
		return err
	}
	if err := zw.Close(); err != nil {
		f.Close()
		return err
	}
	if err := bw.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func writeNewc(w io.Writer, name string, e entry, ino uint32) error {
	nlink := uint32(1)
	if e.mode&0o170000 == sIFDIR {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.major, e.minor, len(name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(name)+8)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	buf = append(buf, make([]byte, pad4(len(buf)))...)
	if _, err := w.Write(buf); err != nil {
		return err
	}
	if len(e.data) > 0 {
		if _, err := w.Write(e.data); err != nil {
			return err
		}
		if _, err := w.Write(make([]byte, pad4(len(e.data)))); err != nil {
			return err
		}
	}
	return nil
}

func pad4(n int) int { return (4 - n%4) % 4 }
