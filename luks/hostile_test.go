package luks

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/ferry-dev/ferry/blockdev"
)

// Headers a hostile source could serve, made by cryptsetup and then altered
// the way an attacker would: each edit keeps valid checksums, so only the
// parser's own checks stand between the header and the target.

// smallVolume is an 8 MiB cryptsetup volume with a 4 MiB header layout and a
// cheap pbkdf2 keyslot.
func smallVolume(t *testing.T) (path, keyFile string, pass []byte) {
	t.Helper()
	return formatVolume(t, 8<<20, FormatOptions{MetadataSize: 16 << 10, KeyslotsSize: 4<<20 - 32<<10, FastKDF: true})
}

// editHeader rewrites the JSON of both header copies of the volume at path
// with mod (numbers stay json.Number), then fixes both sha256 checksums.
func editHeader(t *testing.T, path string, mod func(m map[string]any)) {
	t.Helper()
	editHeaderBytes(t, path, func(copyBin []byte, m map[string]any) { mod(m) })
}

// editHeaderBytes also lets mod change the binary header of each copy.
func editHeaderBytes(t *testing.T, path string, mod func(bin []byte, m map[string]any)) {
	t.Helper()
	dev, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	hdrSize := int64(binary.BigEndian.Uint64(dev[8:16]))
	for _, off := range []int64{0, hdrSize} {
		c := dev[off : off+hdrSize]
		js := c[binHeaderSize:]
		if i := bytes.IndexByte(js, 0); i >= 0 {
			js = js[:i]
		}
		dec := json.NewDecoder(bytes.NewReader(js))
		dec.UseNumber()
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			t.Fatalf("header JSON at %d: %v", off, err)
		}
		mod(c[:binHeaderSize], m)
		out, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(out)) >= hdrSize-binHeaderSize {
			t.Fatalf("edited JSON of %d bytes does not fit", len(out))
		}
		clear(c[binHeaderSize:])
		copy(c[binHeaderSize:], out)
		if string(bytes.TrimRight(c[72:104], "\x00")) != "sha256" {
			t.Fatalf("checksum algorithm %q: the test only refreshes sha256", c[72:104])
		}
		clear(c[448:512])
		sum := sha256.Sum256(c)
		copy(c[448:], sum[:])
	}
	if err := os.WriteFile(path, dev, 0o600); err != nil {
		t.Fatal(err)
	}
}

func obj(m map[string]any, keys ...string) map[string]any {
	for _, k := range keys {
		m = m[k].(map[string]any)
	}
	return m
}

func readHeaderFile(t *testing.T, path string) (*Header, error) {
	t.Helper()
	d, err := blockdev.OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	return ReadHeader(d, d.Size())
}

// cryptsetupAccepts says whether cryptsetup itself loads the header.
func cryptsetupAccepts(path string) bool {
	return exec.Command("cryptsetup", "luksDump", path).Run() == nil
}

func TestHostileHeadersRefused(t *testing.T) {
	cases := []struct {
		name string
		mod  func(m map[string]any)
		want string
		// cryptsetupRejects: cryptsetup refuses this header too; the others
		// are within cryptsetup's format but beyond its limits or ferry's budget.
		cryptsetupRejects bool
	}{
		{"keyslot-area-size-wraps", func(m map[string]any) {
			obj(m, "keyslots", "0", "area")["size"] = "9223372036854775807"
		}, "outside the keyslots area", true},
		{"segment-size-wraps", func(m map[string]any) {
			obj(m, "segments", "0")["size"] = "9223372036850581504" // 2^63 - 4 MiB: offset+size wraps to -2^63
		}, "outside the", false}, // cryptsetup's luksDump shows it; its activation fails later
		{"keyslot-id-beyond-cryptsetup", func(m map[string]any) {
			ks := obj(m, "keyslots")
			ks["32"] = ks["0"]
			delete(ks, "0")
			obj(m, "digests", "0")["keyslots"] = []any{"32"}
		}, "keyslot id", false},
		{"argon2-threads", func(m map[string]any) {
			obj(m, "keyslots", "0")["kdf"] = map[string]any{"type": "argon2id", "time": 4, "memory": 32768, "cpus": 255,
				"salt": obj(m, "keyslots", "0", "kdf")["salt"]}
		}, "outside cryptsetup's limits", false},
		{"argon2-memory-over-4GiB", func(m map[string]any) {
			obj(m, "keyslots", "0")["kdf"] = map[string]any{"type": "argon2id", "time": 4, "memory": 4<<20 + 1, "cpus": 1,
				"salt": obj(m, "keyslots", "0", "kdf")["salt"]}
		}, "outside cryptsetup's limits", false},
		{"pbkdf2-below-cryptsetup-minimum", func(m map[string]any) {
			obj(m, "keyslots", "0", "kdf")["iterations"] = 1
		}, "outside cryptsetup's limits", false},
		{"short-salt", func(m map[string]any) {
			obj(m, "keyslots", "0", "kdf")["salt"] = "AAAA"
		}, "salt", false},
		{"digest-iterations", func(m map[string]any) {
			obj(m, "digests", "0")["iterations"] = 10
		}, "digest 0", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path, _, _ := smallVolume(t)
			editHeader(t, path, tc.mod)
			h, err := readHeaderFile(t, path)
			if err == nil {
				t.Fatalf("accepted: keyslots %v segments %v", h.Meta.Keyslots, h.Meta.Segments)
			}
			if !errors.Is(err, ErrCorruptHeader) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrCorruptHeader mentioning %q", err, tc.want)
			}
			if tc.cryptsetupRejects && cryptsetupAccepts(path) {
				t.Fatal("cryptsetup accepts this header: the case no longer shows an overflow")
			}
		})
	}
}

// withTimeout fails the test when f does not return within d: the
// unrefused version of these headers costs minutes to hours of KDF.
func withTimeout(t *testing.T, d time.Duration, f func() error) error {
	t.Helper()
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	select {
	case err := <-ch:
		return err
	case <-time.After(d):
		t.Fatalf("still running after %s: the KDF cost was not bounded", d)
		return nil
	}
}

func TestUnlockBudget(t *testing.T) {
	cases := []struct {
		name string
		mod  func(m map[string]any)
	}{
		{"pbkdf2-2^30", func(m map[string]any) { obj(m, "keyslots", "0", "kdf")["iterations"] = 1 << 30 }},
		{"argon2-4GiB", func(m map[string]any) {
			obj(m, "keyslots", "0")["kdf"] = map[string]any{"type": "argon2id", "time": 4, "memory": 4 << 20, "cpus": 4,
				"salt": obj(m, "keyslots", "0", "kdf")["salt"]}
		}},
		{"argon2-time-65536", func(m map[string]any) {
			obj(m, "keyslots", "0")["kdf"] = map[string]any{"type": "argon2i", "time": 65536, "memory": 1 << 20, "cpus": 4,
				"salt": obj(m, "keyslots", "0", "kdf")["salt"]}
		}},
		{"digest-2^31-1", func(m map[string]any) { obj(m, "digests", "0")["iterations"] = 1<<31 - 1 }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path, _, pass := smallVolume(t)
			l := headerLayout(t, path)
			editHeader(t, path, tc.mod)
			h, err := readHeaderFile(t, path)
			if err != nil {
				t.Fatalf("within cryptsetup's limits, the header must parse (dump shows it): %v", err)
			}
			if err := h.CheckUnlockCost(); err == nil || !strings.Contains(err.Error(), "budget") {
				t.Fatalf("CheckUnlockCost = %v, want a budget refusal", err)
			}
			d, err := blockdev.OpenFile(path, true)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			err = withTimeout(t, 20*time.Second, func() error { _, err := h.Unlock(d, pass); return err })
			if err == nil || !strings.Contains(err.Error(), "budget") && !strings.Contains(err.Error(), "out of range") {
				t.Fatalf("Unlock = %v, want a budget refusal", err)
			}
			err = withTimeout(t, 20*time.Second, func() error { _, err := OpenCarriedView(d, l, pass); return err })
			if err == nil || !strings.Contains(err.Error(), "budget") {
				t.Fatalf("OpenCarriedView = %v, want a budget refusal", err)
			}
		})
	}
}

// countingDev records which byte ranges were read.
type countingDev struct {
	blockdev.Device
	mu    sync.Mutex
	reads [][2]int64
}

func (c *countingDev) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	c.reads = append(c.reads, [2]int64{off, off + int64(len(p))})
	c.mu.Unlock()
	return c.Device.ReadAt(p, off)
}

// touched says whether any read overlapped [start, end).
func (c *countingDev) touched(start, end int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range c.reads {
		if r[0] < end && start < r[1] {
			return true
		}
	}
	return false
}

// TestCarriedViewComparesBeforeUnlock: a served header that differs from
// the carried layout is refused before any keyslot area is read, i.e.
// before any KDF work and before the passphrase is tried on it.
func TestCarriedViewComparesBeforeUnlock(t *testing.T) {
	path, _, pass := smallVolume(t)
	l := headerLayout(t, path)
	ksStart, ksEnd := 2*l.MetadataSize, 2*l.MetadataSize+l.KeyslotsSize
	f, err := blockdev.OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	for name, mutate := range map[string]func(*Layout){
		"UUID":          func(l *Layout) { l.UUID = "00000000-0000-0000-0000-000000000000" },
		"metadata size": func(l *Layout) { l.MetadataSize = 32 << 10 },
		"keyslots size": func(l *Layout) { l.KeyslotsSize = 1 << 20 },
		"sector size":   func(l *Layout) { l.SectorSize = 4608 - l.SectorSize }, // 512 <-> 4096
	} {
		bad := l
		mutate(&bad)
		dev := &countingDev{Device: f}
		v, err := OpenCarriedView(dev, bad, pass)
		if err == nil {
			v.Close()
			t.Errorf("%s differs: opened anyway", name)
			continue
		}
		if dev.touched(ksStart, ksEnd) {
			t.Errorf("%s differs: the keyslot area was read (an unlock ran) before the refusal: %v", name, err)
		}
	}

	dev := &countingDev{Device: f}
	v, err := OpenCarriedView(dev, l, pass)
	if err != nil {
		t.Fatalf("matching layout refused: %v", err)
	}
	defer v.Close()
	if !dev.touched(ksStart, ksEnd) {
		t.Fatal("the matching header was opened without reading a keyslot: the test does not see unlocks")
	}
	ref, _, err := OpenHeaderView(f, pass)
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	a, b := make([]byte, 64<<10), make([]byte, 64<<10)
	if _, err := v.ReadAt(a, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := ref.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatal("the carried view and the header view read different plaintext")
	}
}

// flipDev serves the real header on the first read of the header area and
// a different one afterwards: a source that answers the check and the
// unlock with different bytes.
type flipDev struct {
	blockdev.Device
	other []byte
	mu    sync.Mutex
	n     int
}

func (d *flipDev) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	d.n++
	n := d.n
	d.mu.Unlock()
	if n > 1 && off < int64(len(d.other)) {
		return copy(p, d.other[off:]), nil
	}
	return d.Device.ReadAt(p, off)
}

// TestDetachedHeaderReadsOnce: the kernel path hands cryptsetup the very
// bytes it checked, so a second, different answer from the source is never
// used; and cryptsetup accepts them as a detached header.
func TestDetachedHeaderReadsOnce(t *testing.T) {
	path, keyFile, _ := smallVolume(t)
	l := headerLayout(t, path)
	f, err := blockdev.OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dev := &flipDev{Device: f, other: make([]byte, 2*l.MetadataSize+l.KeyslotsSize)}
	hdr, payload, err := detachedHeader(dev, l)
	if err != nil {
		t.Fatal(err)
	}
	if dev.n != 1 {
		t.Fatalf("the header area was read %d times, want once", dev.n)
	}
	if payload != l.PayloadSize {
		t.Fatalf("payload %d, want %d", payload, l.PayloadSize)
	}
	if bytes.Equal(hdr, dev.other[:len(hdr)]) {
		t.Fatal("detachedHeader returned the second answer")
	}
	out, err := cryptsetupWithHeader(context.Background(), "cryptsetup", hdr, "open", "--test-passphrase", "--type", "luks2", "--key-file", keyFile, path)
	if err != nil {
		t.Fatalf("cryptsetup rejects the checked header copy: %v: %s", err, out)
	}

	// A header that differs from the carried layout never reaches cryptsetup.
	bad := l
	bad.UUID = "00000000-0000-0000-0000-000000000000"
	if _, _, err := detachedHeader(f, bad); err == nil || !strings.Contains(err.Error(), "carried layout") {
		t.Fatalf("mismatched header: %v", err)
	}
}

func TestDumpEscapesControlCharacters(t *testing.T) {
	path, _, _ := smallVolume(t)
	const evil = "\x1b]0;owned\x07\x1b[2J\u009b31m\u202e\\x1b\xff"
	editHeaderBytes(t, path, func(bin []byte, m map[string]any) {
		clear(bin[24:72])
		copy(bin[24:72], evil) // label
		obj(m, "tokens")["0"] = map[string]any{"type": "\x1b[5m\u009b2J", "keyslots": []any{}}
		obj(m, "config")["flags"] = []any{"allow-discards\x1b[8m"}
	})
	f, err := blockdev.OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d, err := NewDump(f, f.Size())
	if err != nil {
		t.Fatal(err)
	}
	if d.Header.Label != evil[:len(d.Header.Label)] || !strings.Contains(d.Header.Label, "\x1b") {
		t.Fatalf("label %q: the edit did not take", d.Header.Label)
	}
	for name, out := range map[string]string{"text": d.Text("/dev/evil\x1b[0m"), "luksDump": d.Header.LuksDumpText()} {
		for i, r := range out {
			if r == utf8.RuneError || r == 0x7f || r < 0x20 && r != '\n' && r != '\t' || r >= 0x80 && r <= 0x9f || r == 0x202e {
				t.Fatalf("%s output holds %U at byte %d:\n%q", name, r, i, out)
			}
		}
		if !strings.Contains(out, `\x1b]0;owned\x07`) || !strings.Contains(out, `\\x1b`) {
			t.Fatalf("%s output does not show the label escaped:\n%s", name, out)
		}
	}
	js, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	js = EscapeJSONControls(js)
	for _, r := range string(js) {
		if r == 0x7f || r < 0x20 || r >= 0x80 && r <= 0x9f || r == 0x202e {
			t.Fatalf("JSON output holds %U", r)
		}
	}
	var back Dump
	if err := json.Unmarshal(js, &back); err != nil || back.Header.Label != strings.ToValidUTF8(d.Header.Label, "\uFFFD") {
		t.Fatalf("escaped JSON does not decode to the same label: %v %q", err, back.Header.Label)
	}
}

func TestEsc(t *testing.T) {
	for in, want := range map[string]string{
		"plain label": "plain label",
		"a\x1bb":      `a\x1bb`,
		"tab\there":   `tab\x09here`,
		"back\\slash": `back\\slash`,
		"\xff":        `\xff`,
		"\u009b":      `\x9b`,
		"rtl\u202e":   `rtl\u202e`,
		"ünïcode":     "ünïcode",
	} {
		if got := esc(in); got != want {
			t.Errorf("esc(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestCarriedLayoutOverflow: the layout comes from the replicated record,
// written by the source; sizes whose sum wraps must not pass as small.
func TestCarriedLayoutOverflow(t *testing.T) {
	l := Layout{DataOffset: 16 << 20, SectorSize: 512, Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: 1<<63 - 512}
	if err := l.Validate(); err == nil || !strings.Contains(err.Error(), "overflows") {
		t.Fatalf("Validate = %v (device size %d)", err, l.DeviceSize())
	}
	if _, err := CheckCompatible(l, 32<<20); err == nil {
		t.Fatal("CheckCompatible accepted a wrapping layout")
	}
}
