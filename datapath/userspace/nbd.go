package userspace

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/datapath/internal/hostfs"
	"github.com/ferry-dev/ferry/datapath/nbdexport"
	"github.com/ferry-dev/ferry/luks"
)

// ProbeNBD says what this host lacks to serve volumes over NBD with kernel
// dm-crypt over them (nil: --block-export auto picks it): the nbd module's
// devices, device-mapper, cryptsetup and dmsetup.
func ProbeNBD(ctx context.Context) error {
	var missing []string
	if !nbdexport.Available() {
		missing = append(missing, "NBD devices (modprobe nbd)")
	}
	if _, err := os.Stat("/dev/mapper/control"); err != nil {
		missing = append(missing, "device-mapper (/dev/mapper/control)")
	}
	for _, tool := range []string{"cryptsetup", "dmsetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("no NBD block export: missing %s", strings.Join(missing, ", "))
	}
	return nil
}

// nbdOf returns the NBD device under vol's dm-crypt mapping, if the
// mapping exists.
func nbdOf(vol string) (string, bool) {
	dm, err := filepath.EvalSymlinks(NBDDevice(vol))
	if err != nil {
		return "", false
	}
	slaves, _ := os.ReadDir(filepath.Join("/sys/block", filepath.Base(dm), "slaves"))
	for _, sl := range slaves {
		if strings.HasPrefix(sl.Name(), "nbd") {
			return sl.Name(), true
		}
	}
	return "", true
}

// nbdDead reports whether vol's dm-crypt mapping is left over an NBD device
// no process serves any more (every I/O through it fails).
func (v *Backend) nbdDead(ctx context.Context, vol string) bool {
	dev, ok := nbdOf(vol)
	if !ok {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := v.Process(ctx, vol); err == nil {
		return false
	}
	if dev == "" {
		return true // a mapping over nothing
	}
	_, err := os.Stat(filepath.Join("/sys/block", dev, "pid"))
	return errors.Is(err, os.ErrNotExist)
}

// releaseDeadNBD removes what a dead datapath left of vol: its dm-crypt
// mapping (its I/O fails already; --force swaps in an error table if a
// lazily unmounted filesystem still holds it) and the NBD device under it.
func releaseDeadNBD(ctx context.Context, vol string) error {
	dev, ok := nbdOf(vol)
	if !ok {
		return nil
	}
	name := NBDCryptName(vol)
	if err := luks.CloseKernel(ctx, name); err != nil {
		tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		out, ferr := exec.CommandContext(tctx, "dmsetup", "remove", "--force", name).CombinedOutput()
		cancel()
		if ferr != nil {
			return fmt.Errorf("remove the dm-crypt mapping %s of the dead datapath of volume %s: %w (%v: %s)", name, vol, err, ferr, strings.TrimSpace(string(out)))
		}
	}
	if dev != "" {
		if err := nbdexport.Release("/dev/" + dev); err != nil {
			return fmt.Errorf("release %s of the dead datapath of volume %s: %w", dev, vol, err)
		}
	}
	return nil
}

// servedDevices are the block devices a machine may have vol mounted from:
// the dm-crypt device over NBD, or the loop devices over the FUSE file.
func (v *Backend) servedDevices(vol string) ([]string, error) {
	if v.servedOverNBD(vol) {
		dev := NBDDevice(vol)
		if _, err := os.Stat(dev); err != nil {
			return nil, nil
		}
		return []string{dev}, nil
	}
	return v.Loops.FindByBackingFile(filepath.Join(v.FuseDir(vol), DeviceFile))
}

// extendServedNBD grows a volume served over NBD: the datapath grows the
// file and the NBD device, cryptsetup the dm-crypt mapping (it needs the
// passphrase), resize2fs the filesystem, online when mounted. Each step
// finds its work done when repeated.
func (v *Backend) extendServedNBD(ctx context.Context, p *Process, vol string, next luks.Layout, passphrase []byte) error {
	if err := p.Grow(ctx, next.PayloadSize); err != nil {
		return fmt.Errorf("extend volume %s: %w", vol, err)
	}
	err := hostfs.WithKeyFile(v.runDir(), passphrase, func(kf string) error {
		return luks.ResizeKernel(ctx, NBDCryptName(vol), next, kf)
	})
	if err != nil {
		return fmt.Errorf("extend volume %s: %w", vol, err)
	}
	dev := NBDDevice(vol)
	_, mounted := mountedFrom(dev)
	if err := hostfs.GrowExt4(ctx, dev, mounted); err != nil {
		return fmt.Errorf("extend volume %s: %w", vol, err)
	}
	return nil
}

// ExportAuto is --block-export auto: PickBlockExport decides per host.
const ExportAuto = "auto"

// nbdFixedIn is the first kernel whose NBD client no longer resends a
// request it sent only in part ("nbd: fix partial sending", 6.13): the
// likeliest cause of the rare request the test VM's 6.1 kernel left
// unanswered until its timeout (docs/clone.md). auto picks NBD only there.
var nbdFixedIn = [2]int{6, 13}

// PickBlockExport is the block export --block-export auto runs on this
// host, and why: NBD with kernel dm-crypt where the host has every part
// (ProbeNBD) and a kernel from nbdFixedIn on, FUSE otherwise.
func PickBlockExport(ctx context.Context) (string, string) {
	var uts unix.Utsname
	release := ""
	if err := unix.Uname(&uts); err == nil {
		release = unix.ByteSliceToString(uts.Release[:])
	}
	return pickBlockExport(release, ProbeNBD(ctx))
}

// pickBlockExport decides from the kernel release and ProbeNBD's answer.
func pickBlockExport(release string, probe error) (string, string) {
	if probe != nil {
		return ExportFUSE, probe.Error()
	}
	v, ok := kernelVersion(release)
	if !ok || v[0] < nbdFixedIn[0] || v[0] == nbdFixedIn[0] && v[1] < nbdFixedIn[1] {
		return ExportFUSE, fmt.Sprintf("kernel %q predates %d.%d, whose NBD client no longer resends a request it sent only in part; --block-export nbd overrides",
			release, nbdFixedIn[0], nbdFixedIn[1])
	}
	return ExportNBD, fmt.Sprintf("kernel %s has NBD, device-mapper and the NBD fix of %d.%d: kernel dm-crypt over the userspace clone", release, nbdFixedIn[0], nbdFixedIn[1])
}

// kernelVersion parses the major and minor number of a kernel release
// such as "6.1.0-28-amd64".
func kernelVersion(release string) ([2]int, bool) {
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return [2]int{}, false
	}
	major, err1 := strconv.Atoi(parts[0])
	minorDigits := parts[1]
	if i := strings.IndexFunc(parts[1], func(r rune) bool { return r < '0' || r > '9' }); i >= 0 {
		minorDigits = parts[1][:i]
	}
	minor, err2 := strconv.Atoi(minorDigits)
	if err1 != nil || err2 != nil {
		return [2]int{}, false
	}
	return [2]int{major, minor}, true
}
