package luks

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"

	"github.com/ferry-dev/ferry/blockdev"
)

// The kernel backend opens the plaintext view with dm-crypt (cryptsetup
// open), on hosts whose kernel has it. cryptsetup reads the header on the
// device; ferry first checks that header against the layout carried from
// the source, and afterwards checks the mapping dm-crypt built, so a volume
// is never opened at an offset or size the source did not have.

// CryptTable is the part of a dm-crypt table line ferry checks.
type CryptTable struct {
	Sectors    int64 // length of the mapping, 512-byte sectors
	Cipher     string
	Device     string // major:minor or path of the backing device
	Offset     int64  // start of the ciphertext on Device, 512-byte sectors
	SectorSize int    // encryption sector size, bytes (512 unless sector_size:N)
	Features   []string
}

// AllowDiscards reports whether the mapping passes discards down.
func (c CryptTable) AllowDiscards() bool {
	for _, f := range c.Features {
		if f == "allow_discards" {
			return true
		}
	}
	return false
}

// ParseCryptTable parses one `dmsetup table` line of a crypt target:
//
//	<start> <len> crypt <cipher> <key> <iv_offset> <device> <offset> [<#opt> <opt>...]
//
// The key field is never kept (it is a keyring reference, or the hex key
// itself when cryptsetup had no keyring).
func ParseCryptTable(line string) (CryptTable, error) {
	var c CryptTable
	f := strings.Fields(line)
	if len(f) < 8 || f[2] != "crypt" {
		return c, fmt.Errorf("dm-crypt table: not a single crypt target (%d fields)", len(f))
	}
	var err error
	if c.Sectors, err = strconv.ParseInt(f[1], 10, 64); err != nil || c.Sectors <= 0 {
		return c, fmt.Errorf("dm-crypt table: bad length %q", f[1])
	}
	c.Cipher, c.Device = f[3], f[6]
	if c.Offset, err = strconv.ParseInt(f[7], 10, 64); err != nil || c.Offset < 0 {
		return c, fmt.Errorf("dm-crypt table: bad offset %q", f[7])
	}
	c.SectorSize = 512
	if len(f) > 8 {
		n, err := strconv.Atoi(f[8])
		if err != nil || n < 0 || n != len(f)-9 {
			return c, fmt.Errorf("dm-crypt table: option count %q does not match %d options", f[8], len(f)-9)
		}
		c.Features = append([]string(nil), f[9:]...)
		for _, o := range c.Features {
			if v, ok := strings.CutPrefix(o, "sector_size:"); ok {
				if c.SectorSize, err = strconv.Atoi(v); err != nil || c.SectorSize < 512 {
					return c, fmt.Errorf("dm-crypt table: bad option %q", o)
				}
			}
		}
	}
	return c, nil
}

// CheckHeaderMatches reads the LUKS2 header on dev and refuses when it does
// not describe the carried layout: another volume, another data offset,
// sector size, cipher or key size, or a device whose size would give a
// different plaintext size. It returns the plaintext size.
func CheckHeaderMatches(dev blockdev.Device, layout Layout) (int64, error) {
	payload, err := CheckCompatible(layout, dev.Size())
	if err != nil {
		return 0, err
	}
	h, err := ReadHeader(dev, dev.Size())
	if err != nil {
		return 0, fmt.Errorf("reading the LUKS2 header: %w", err)
	}
	got, err := h.Layout(dev.Size())
	if err != nil {
		return 0, err
	}
	mismatch := func(what string, have, want any) error {
		return fmt.Errorf("the header on the device does not match the carried layout: %s is %v, the source's is %v; refusing to open a different volume or at a different offset", what, have, want)
	}
	switch {
	case layout.UUID != "" && got.UUID != layout.UUID:
		return 0, mismatch("UUID", got.UUID, layout.UUID)
	case got.DataOffset != layout.DataOffset:
		return 0, mismatch("data offset", got.DataOffset, layout.DataOffset)
	case got.SectorSize != layout.SectorSize:
		return 0, mismatch("sector size", got.SectorSize, layout.SectorSize)
	case got.Cipher != layout.Cipher:
		return 0, mismatch("cipher", got.Cipher, layout.Cipher)
	case got.KeyBytes != layout.KeyBytes:
		return 0, mismatch("key size", got.KeyBytes, layout.KeyBytes)
	case got.PayloadSize != payload:
		return 0, mismatch("plaintext size", got.PayloadSize, payload)
	}
	return payload, nil
}

// OpenKernel opens the plaintext view of the LUKS2 volume on block device
// dev as /dev/mapper/<name> with `cryptsetup open --allow-discards`, after
// checking the device's header against the carried layout, and checks the
// resulting dm-crypt mapping starts at the carried data offset and has the
// carried size. keyFile holds the passphrase (never logged). An existing
// mapping of that name is adopted when it passes the same check.
func OpenKernel(ctx context.Context, dev, name string, layout Layout, keyFile string) (string, error) {
	if name == "" || strings.ContainsAny(name, " \t\n/") {
		return "", fmt.Errorf("luks kernel open: name %q must be non-empty, without spaces or slashes", name)
	}
	bin, err := exec.LookPath("cryptsetup")
	if err != nil {
		return "", fmt.Errorf("luks kernel open needs cryptsetup (Debian package cryptsetup-bin): %w", err)
	}
	d, err := blockdev.OpenFile(dev, true)
	if err != nil {
		return "", fmt.Errorf("luks kernel open: %w", err)
	}
	payload, err := CheckHeaderMatches(d, layout)
	d.Close()
	if err != nil {
		return "", fmt.Errorf("luks kernel open %s: %w", dev, err)
	}
	mapper := "/dev/mapper/" + name
	if _, err := dmTable(ctx, name); err != nil {
		args := []string{"open", "--type", "luks2", "--allow-discards", "--key-file", keyFile, dev, name}
		if out, err := runQuiet(ctx, bin, args...); err != nil {
			return "", fmt.Errorf("cryptsetup open %s as %s (is dm-crypt loaded? is the key right?): %w: %s", dev, name, err, out)
		}
	}
	line, err := dmTable(ctx, name)
	if err == nil {
		err = checkMapping(line, layout, payload)
	}
	if err != nil {
		_ = CloseKernel(ctx, name)
		return "", fmt.Errorf("luks kernel open %s: %w (closed it again)", dev, err)
	}
	return mapper, nil
}

// checkMapping compares a live crypt table with the carried layout.
func checkMapping(line string, layout Layout, payload int64) error {
	c, err := ParseCryptTable(line)
	if err != nil {
		return err
	}
	switch {
	case c.Offset*512 != layout.DataOffset:
		return fmt.Errorf("dm-crypt maps ciphertext at byte %d, the carried layout says %d", c.Offset*512, layout.DataOffset)
	case c.Sectors*512 != payload:
		return fmt.Errorf("dm-crypt maps %d plaintext bytes, the carried layout says %d", c.Sectors*512, payload)
	case c.SectorSize != layout.SectorSize:
		return fmt.Errorf("dm-crypt uses %d-byte sectors, the carried layout says %d", c.SectorSize, layout.SectorSize)
	case !c.AllowDiscards():
		return errors.New("dm-crypt mapping does not allow discards: fstrim would not reach the clone")
	}
	return nil
}

// CloseKernel closes the dm-crypt mapping name. A missing mapping is not an error.
func CloseKernel(ctx context.Context, name string) error {
	if _, err := dmTable(ctx, name); err != nil {
		return nil
	}
	if out, err := runQuiet(ctx, "cryptsetup", "close", name); err != nil {
		return fmt.Errorf("cryptsetup close %s (is it mounted or open?): %w: %s", name, err, out)
	}
	return nil
}

func dmTable(ctx context.Context, name string) (string, error) {
	out, err := runQuiet(ctx, "dmsetup", "table", name)
	if err != nil {
		return "", fmt.Errorf("dmsetup table %s: %w: %s", name, err, out)
	}
	return strings.TrimSpace(out), nil
}

func runQuiet(ctx context.Context, bin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return strings.TrimSpace(out.String()), err
}
