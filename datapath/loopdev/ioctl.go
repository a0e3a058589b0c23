package loopdev

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// errNoConfigure: the kernel has no LOOP_CONFIGURE (before 5.8) or no
// loop-control; Attach then runs losetup.
var errNoConfigure = errors.New("LOOP_CONFIGURE not available")

// attachIoctl binds abs to a free loop device with the ioctls losetup
// uses, without a process: a migration's target attaches one inside the
// machine's pause, and a losetup there took 5 to 20 ms on a busy machine.
func attachIoctl(abs string, directIO bool) (string, error) {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", errNoConfigure
	}
	defer ctl.Close()
	flags := os.O_RDWR | unix.O_CLOEXEC
	if directIO {
		flags |= unix.O_DIRECT
	}
	back, err := os.OpenFile(abs, flags, 0)
	if err != nil {
		return "", fmt.Errorf("open %s for a loop device: %w", abs, err)
	}
	defer back.Close()
	cfg := unix.LoopConfig{Fd: uint32(back.Fd())}
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], abs)
	if directIO {
		cfg.Info.Flags |= unix.LO_FLAGS_DIRECT_IO
	}
	// Another process may take the free device between the two calls
	// (EBUSY): ask for the next free one, as losetup does.
	for attempt := 0; ; attempt++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", fmt.Errorf("find a free loop device: %w", err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		f, err := openNode(dev)
		if err != nil {
			return "", err
		}
		err = unix.IoctlLoopConfigure(int(f.Fd()), &cfg)
		f.Close()
		switch {
		case err == nil:
			return dev, nil
		case errors.Is(err, unix.EBUSY) && attempt < 16:
			continue
		case errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOTTY):
			return "", errNoConfigure
		default:
			return "", fmt.Errorf("bind %s to %s: %w", abs, dev, err)
		}
	}
}

// openNode opens a loop device node, waiting briefly for devtmpfs to make
// one the kernel just created.
func openNode(dev string) (*os.File, error) {
	deadline := time.Now().Add(time.Second)
	for {
		f, err := os.OpenFile(dev, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil || !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			return f, err
		}
		time.Sleep(time.Millisecond)
	}
}

// detachIoctl unbinds dev (LOOP_CLR_FD); a device still open elsewhere is
// released by the kernel on its last close. One no longer bound is no
// error.
func detachIoctl(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENXIO) {
			return nil
		}
		return err
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return err
	}
	return nil
}
