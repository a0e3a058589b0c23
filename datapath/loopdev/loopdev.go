// Package loopdev attaches a file to a loop block device (the kernel's
// loop-control and LOOP_CONFIGURE, or util-linux's losetup on a kernel
// without it), so the kernel (and a filesystem) can use a FUSE-exported clone.
// Loop devices are global kernel objects: callers detach what they attach,
// and FindByBackingFile lets a restarted agent re-adopt its devices.
package loopdev

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-dev/ferry/datapath/internal/mountns"
)

// Device is one attached loop device as losetup lists it.
type Device struct {
	Name      string `json:"name"`
	BackFile  string `json:"back-file"`
	DirectIO  bool   `json:"dio"`
	ReadOnly  bool   `json:"ro"`
	SizeLimit int64  `json:"sizelimit"`
}

// ErrNoLosetup is returned when util-linux's losetup is missing.
var ErrNoLosetup = errors.New("losetup not found: install util-linux")

const cmdTimeout = 30 * time.Second

func losetup(args ...string) ([]byte, error) {
	bin, err := exec.LookPath("losetup")
	if err != nil {
		return nil, ErrNoLosetup
	}
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("losetup %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// Attach binds path to the first free loop device and returns its node
// (/dev/loopN). With directIO the loop device opens path with O_DIRECT, so
// the data is not cached twice (once in the loop device's page cache, once
// under path); if the kernel refuses direct I/O for path, Attach detaches
// again and fails rather than silently caching.
func Attach(path string, directIO bool) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", fmt.Errorf("attach %s: %w", path, err)
	}
	if _, err := os.Stat(abs); err != nil {
		return "", fmt.Errorf("attach %s to a loop device: %w", abs, err)
	}
	dev, err := attachIoctl(abs, directIO)
	if errors.Is(err, errNoConfigure) {
		args := []string{"--find", "--show"}
		if directIO {
			args = append(args, "--direct-io=on")
		}
		out, err := losetup(append(args, abs)...)
		if err != nil {
			return "", err
		}
		dev = strings.TrimSpace(string(out))
		if !strings.HasPrefix(dev, "/dev/loop") {
			return "", fmt.Errorf("losetup printed %q instead of a loop device for %s", dev, abs)
		}
	} else if err != nil {
		return "", err
	}
	if directIO {
		info, err := Info(dev)
		if err != nil || !info.DirectIO {
			Detach(dev)
			if err == nil {
				err = errors.New("the kernel kept buffered I/O")
			}
			return "", fmt.Errorf("direct I/O on %s for %s: %w (does the backing filesystem support O_DIRECT?)", dev, abs, err)
		}
	}
	return dev, nil
}

// SetCapacity makes a loop device re-read its backing file's size after the
// file grew; the filesystem above stays mounted.
func SetCapacity(dev string) error {
	if !strings.HasPrefix(dev, "/dev/loop") {
		return fmt.Errorf("%q is not a loop device", dev)
	}
	if _, err := losetup("--set-capacity", dev); err != nil {
		return fmt.Errorf("grow %s to its backing file's new size: %w", dev, err)
	}
	return nil
}

// Detach releases a loop device. Detaching a device that is no longer
// attached is not an error, so callers can retry.
func Detach(dev string) error {
	if !strings.HasPrefix(dev, "/dev/loop") {
		return fmt.Errorf("%q is not a loop device", dev)
	}
	if _, err := Info(dev); err != nil {
		return nil
	}
	if err := detachIoctl(dev); err != nil {
		return fmt.Errorf("detach %s (unmount whatever uses it first): %w", dev, err)
	}
	// The kernel only marks a device still open by someone for release on
	// last close; wait until it is really gone, so the caller can unmount
	// the backing file's filesystem next.
	deadline := time.Now().Add(5 * time.Second)
	for {
		info, err := Info(dev)
		if err != nil || info.BackFile == "" {
			return nil
		}
		if time.Now().After(deadline) {
			if rdev, err := mountns.DeviceOf(dev); err == nil {
				if why := mountns.Explain(rdev, dev); why != "" {
					return fmt.Errorf("%s is still open after detaching: %s", dev, why)
				}
				if hs := mountns.OpenOn(rdev); len(hs) > 0 {
					return fmt.Errorf("%s is still open after detaching (it goes away on last close; a filesystem unmounted lazily lives on while its files are open): %s", dev, strings.Join(hs, "; "))
				}
			}
			return fmt.Errorf("%s is still open by someone after detaching (it goes away on last close): find the holder with fuser -v %s", dev, dev)
		}
		// Usually gone within milliseconds (udev's probe closing it); a
		// migration's source waits here inside the downtime.
		time.Sleep(2 * time.Millisecond)
	}
}

// List returns every attached loop device.
//
// It reads what losetup itself reads, /sys/block/loop*/loop, without a
// process per look: a migration looks several times inside its downtime
// (2 to 5 ms a losetup on a busy machine). Without sysfs it asks losetup.
func List() ([]Device, error) {
	if devs, err := listSysfs("/sys/block"); err == nil {
		return devs, nil
	}
	out, err := losetup("--list", "--json", "--output", "NAME,BACK-FILE,DIO,RO,SIZELIMIT")
	if err != nil {
		return nil, err
	}
	return parseList(out)
}

// listSysfs lists the attached loop devices under a sysfs block directory:
// a device has a loop/ directory only while a file is bound to it.
func listSysfs(root string) ([]Device, error) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	read := func(dir, name string) (string, error) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		return strings.TrimSuffix(string(b), "\n"), err
	}
	var devs []Device
	for _, e := range ents {
		name := e.Name()
		if !strings.HasPrefix(name, "loop") {
			continue
		}
		dir := filepath.Join(root, name)
		back, err := read(dir, "loop/backing_file")
		if errors.Is(err, os.ErrNotExist) {
			continue // not attached (or detached while we looked)
		}
		if err != nil {
			return nil, err
		}
		d := Device{Name: "/dev/" + name, BackFile: back}
		dio, _ := read(dir, "loop/dio")
		ro, _ := read(dir, "ro")
		limit, _ := read(dir, "loop/sizelimit")
		d.DirectIO, d.ReadOnly = dio == "1", ro == "1"
		d.SizeLimit, _ = strconv.ParseInt(limit, 10, 64)
		devs = append(devs, d)
	}
	return devs, nil
}

// parseList reads losetup --json output. losetup prints booleans as 0/1
// numbers in some versions and true/false in others.
func parseList(out []byte) ([]Device, error) {
	if len(bytes.TrimSpace(out)) == 0 {
		return nil, nil
	}
	var raw struct {
		Loop []map[string]json.RawMessage `json:"loopdevices"`
	}
	if err := json.Unmarshal(out, &raw); err != nil {
		return nil, fmt.Errorf("parse losetup output: %w", err)
	}
	devs := make([]Device, 0, len(raw.Loop))
	for _, m := range raw.Loop {
		var d Device
		json.Unmarshal(m["name"], &d.Name)
		json.Unmarshal(m["back-file"], &d.BackFile)
		d.DirectIO = jsonBool(m["dio"])
		d.ReadOnly = jsonBool(m["ro"])
		var sl json.Number
		if json.Unmarshal(m["sizelimit"], &sl) == nil {
			d.SizeLimit, _ = sl.Int64()
		}
		if d.Name == "" {
			return nil, errors.New("parse losetup output: a device without a name")
		}
		devs = append(devs, d)
	}
	return devs, nil
}

func jsonBool(m json.RawMessage) bool {
	s := strings.Trim(string(m), `"`)
	return s == "true" || s == "1"
}

// Info describes one attached loop device.
func Info(dev string) (Device, error) {
	devs, err := List()
	if err != nil {
		return Device{}, err
	}
	for _, d := range devs {
		if d.Name == dev {
			return d, nil
		}
	}
	return Device{}, fmt.Errorf("%s is not attached", dev)
}

// FindByBackingFile returns the loop devices whose backing file is path.
// The kernel records the path the file was attached with (and appends
// " (deleted)" if it went away), so path is compared in absolute form.
func FindByBackingFile(path string) ([]string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	devs, err := List()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, d := range devs {
		bf := strings.TrimSuffix(d.BackFile, " (deleted)")
		if bf == abs {
			out = append(out, d.Name)
		}
	}
	return out, nil
}
