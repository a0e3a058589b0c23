package luks

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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
// header or keyslots size, sector size, cipher or key size, a device whose
// size would give a different plaintext size, or a keyslot dearer to open
// than ferry's unlock budget. It returns the plaintext size.
func CheckHeaderMatches(dev blockdev.Device, layout Layout) (int64, error) {
	h, err := ReadHeader(dev, dev.Size())
	if err != nil {
		return 0, fmt.Errorf("reading the LUKS2 header: %w", err)
	}
	return h.MatchLayout(layout, dev.Size())
}

// MatchLayout compares h, read from a device of deviceSize bytes, with the
// layout carried from the source, and checks every keyslot that can open it
// is within ferry's unlock budget. Callers run it before any unlock: the
// header comes from the source, the layout from the replicated record.
func (h *Header) MatchLayout(layout Layout, deviceSize int64) (int64, error) {
	payload, err := CheckCompatible(layout, deviceSize)
	if err != nil {
		return 0, err
	}
	got, err := h.Layout(deviceSize)
	if err != nil {
		return 0, err
	}
	mismatch := func(what string, have, want any) error {
		return fmt.Errorf("the header on the device does not match the carried layout: %s is %v, the source's is %v; refusing to open a different volume or at a different offset", what, have, want)
	}
	switch {
	case layout.UUID != "" && got.UUID != layout.UUID:
		return 0, mismatch("UUID", esc(got.UUID), layout.UUID)
	case got.DataOffset != layout.DataOffset:
		return 0, mismatch("data offset", got.DataOffset, layout.DataOffset)
	case layout.MetadataSize != 0 && got.MetadataSize != layout.MetadataSize:
		return 0, mismatch("metadata size", got.MetadataSize, layout.MetadataSize)
	case layout.KeyslotsSize != 0 && got.KeyslotsSize != layout.KeyslotsSize:
		return 0, mismatch("keyslots size", got.KeyslotsSize, layout.KeyslotsSize)
	case got.SectorSize != layout.SectorSize:
		return 0, mismatch("sector size", got.SectorSize, layout.SectorSize)
	case got.Cipher != layout.Cipher:
		return 0, mismatch("cipher", esc(got.Cipher), layout.Cipher)
	case got.KeyBytes != layout.KeyBytes:
		return 0, mismatch("key size", got.KeyBytes, layout.KeyBytes)
	case got.PayloadSize != payload:
		return 0, mismatch("plaintext size", got.PayloadSize, payload)
	}
	if err := h.CheckUnlockCost(); err != nil {
		return 0, fmt.Errorf("the header on the device asks too much work to open: %w", err)
	}
	return payload, nil
}

// detachedHeader reads the header area of dev (both metadata copies and the
// keyslots area, as the carried layout sizes them) once into memory, checks
// it against layout and returns the bytes. cryptsetup then opens exactly
// these bytes (--header), so a source serving a different header on a
// second read cannot change what is unlocked.
func detachedHeader(dev blockdev.Device, layout Layout) ([]byte, int64, error) {
	if !validMetadataSize(layout.MetadataSize) || layout.KeyslotsSize < 0 || layout.KeyslotsSize > maxKeyslotsSize {
		return nil, 0, fmt.Errorf("carried layout has metadata size %d and keyslots size %d: not a LUKS2 header area", layout.MetadataSize, layout.KeyslotsSize)
	}
	n := 2*layout.MetadataSize + layout.KeyslotsSize
	if n > dev.Size() {
		return nil, 0, fmt.Errorf("device of %d bytes is smaller than the %d-byte header area of the carried layout", dev.Size(), n)
	}
	b := make([]byte, n)
	if _, err := dev.ReadAt(b, 0); err != nil {
		return nil, 0, fmt.Errorf("reading the %d-byte LUKS2 header area: %w", n, err)
	}
	h, err := ReadHeader(prefixReader(b), dev.Size())
	if err != nil {
		return nil, 0, fmt.Errorf("reading the LUKS2 header: %w", err)
	}
	payload, err := h.MatchLayout(layout, dev.Size())
	if err != nil {
		return nil, 0, err
	}
	return b, payload, nil
}

// prefixReader is the start of a device held in memory; reads past it fail
// rather than reach the device again.
type prefixReader []byte

func (p prefixReader) ReadAt(b []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(p)) || int64(len(b)) > int64(len(p))-off {
		return 0, fmt.Errorf("read of %d bytes at %d is outside the %d-byte header area read once", len(b), off, len(p))
	}
	return copy(b, p[off:]), nil
}

// OpenKernel opens the plaintext view of the LUKS2 volume on block device
// dev as /dev/mapper/<name> with `cryptsetup open --allow-discards`, after
// checking the device's header against the carried layout, and checks the
// resulting dm-crypt mapping starts at the carried data offset and has the
// carried size. cryptsetup reads the header from a private copy of the
// bytes that were checked, never from dev again. keyFile holds the
// passphrase (never logged). An existing mapping of that name is adopted
// when it passes the same check.
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
	hdr, payload, err := detachedHeader(d, layout)
	d.Close()
	if err != nil {
		return "", fmt.Errorf("luks kernel open %s: %w", dev, err)
	}
	mapper := "/dev/mapper/" + name
	if _, err := dmTable(ctx, name); err != nil {
		if out, err := cryptsetupWithHeader(ctx, bin, hdr, "open", "--type", "luks2", "--allow-discards", "--key-file", keyFile, dev, name); err != nil {
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

// cryptsetupWithHeader runs cryptsetup with --header pointing at a private
// 0600 file holding hdr, removed when cryptsetup returns (an open mapping
// does not need its header any more).
func cryptsetupWithHeader(ctx context.Context, bin string, hdr []byte, action string, args ...string) (string, error) {
	dir, err := os.MkdirTemp("", "ferry-luks-header-")
	if err != nil {
		return "", fmt.Errorf("temporary header folder: %w", err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "header")
	if err := os.WriteFile(path, hdr, 0o600); err != nil {
		return "", fmt.Errorf("writing the checked header copy: %w", err)
	}
	return runQuiet(ctx, bin, append([]string{action, "--header", path}, args...)...)
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

// ResizeKernel grows the open dm-crypt mapping name to layout's payload with
// `cryptsetup resize` (the LUKS2 segment is dynamic: the header needs no
// change). It refuses a mapping whose data offset is not the layout's and
// never shrinks; a mapping already that size is left alone, so a repeated
// call after a crash finishes the job. keyFile holds the passphrase:
// cryptsetup keeps the volume key in the kernel keyring and needs it again
// to load the grown table.
func ResizeKernel(ctx context.Context, name string, layout Layout, keyFile string) error {
	table, err := dmTable(ctx, name)
	if err != nil {
		return err
	}
	c, err := ParseCryptTable(table)
	if err != nil {
		return fmt.Errorf("device-mapper %s: %w", name, err)
	}
	if c.Offset*512 != layout.DataOffset {
		return fmt.Errorf("dm-crypt %s maps ciphertext at byte %d, the volume's layout says %d: not resizing a mapping that is not this volume's", name, c.Offset*512, layout.DataOffset)
	}
	sectors := layout.PayloadSize / 512
	switch {
	case c.Sectors == sectors:
		return nil
	case c.Sectors > sectors:
		return fmt.Errorf("dm-crypt %s maps %d bytes, more than the %d asked: refusing to shrink", name, c.Sectors*512, layout.PayloadSize)
	}
	if out, err := runQuiet(ctx, "cryptsetup", "resize", "--key-file", keyFile, "--size", fmt.Sprint(sectors), name); err != nil {
		return fmt.Errorf("cryptsetup resize %s to %d sectors (is the passphrase right?): %w: %s", name, sectors, err, out)
	}
	if table, err = dmTable(ctx, name); err != nil {
		return err
	}
	if c, err = ParseCryptTable(table); err != nil || c.Sectors != sectors {
		return fmt.Errorf("dm-crypt %s after cryptsetup resize: %d sectors, want %d (%v)", name, c.Sectors, sectors, err)
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
