package luks

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

const (
	testHdrSize = 16384
	testDevSize = 8 << 20
)

// testJSON is a LUKS2 JSON area like cryptsetup writes for the 4 MiB layout.
func testJSON(mod func(string) string) string {
	js := `{"keyslots":{"0":{"type":"luks2","key_size":64,"af":{"type":"luks1","stripes":4000,"hash":"sha256"},` +
		`"area":{"type":"raw","offset":"32768","size":"258048","encryption":"aes-xts-plain64","key_size":64},` +
		`"kdf":{"type":"pbkdf2","hash":"sha256","iterations":1000,"salt":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}},` +
		`"tokens":{},"segments":{"0":{"type":"crypt","offset":"4194304","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":512}},` +
		`"digests":{"0":{"type":"pbkdf2","keyslots":["0"],"segments":["0"],"hash":"sha256","iterations":1000,` +
		`"salt":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","digest":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}},` +
		`"config":{"json_size":"12288","keyslots_size":"4161536"}}`
	if mod != nil {
		js = mod(js)
	}
	return js
}

// writeCopy writes one header copy with a correct sha256 checksum.
func writeCopy(dev []byte, off int64, magic []byte, hdrSize int64, seq uint64, js string) {
	c := dev[off : off+hdrSize]
	clear(c)
	copy(c, magic)
	binary.BigEndian.PutUint16(c[6:], 2)
	binary.BigEndian.PutUint64(c[8:], uint64(hdrSize))
	binary.BigEndian.PutUint64(c[16:], seq)
	copy(c[72:], "sha256")
	copy(c[168:], "11111111-2222-3333-4444-555555555555")
	binary.BigEndian.PutUint64(c[256:], uint64(off))
	copy(c[4096:], js)
	sum := sha256.Sum256(c)
	copy(c[448:], sum[:])
}

// testDevice is an 8 MiB device with two valid copies (seqid 5) of js.
func testDevice(js string) []byte {
	dev := make([]byte, testDevSize)
	writeCopy(dev, 0, magicPrimary, testHdrSize, 5, js)
	writeCopy(dev, testHdrSize, magicSecondary, testHdrSize, 5, js)
	return dev
}

func TestSyntheticHeaderIsValid(t *testing.T) {
	dev := testDevice(testJSON(nil))
	h, err := ReadHeader(bytes.NewReader(dev), int64(len(dev)))
	if err != nil {
		t.Fatal(err)
	}
	l, err := h.Layout(int64(len(dev)))
	if err != nil {
		t.Fatal(err)
	}
	if l.DataOffset != 4<<20 || l.PayloadSize != 4<<20 || l.KeyBytes != 64 || l.KeyslotsSize != 4161536 {
		t.Fatalf("layout %+v", l)
	}
}

func TestCopySelection(t *testing.T) {
	js := testJSON(nil)
	t.Run("PrimaryCorrupt", func(t *testing.T) {
		dev := testDevice(js)
		dev[4100] ^= 1 // inside the JSON area: checksum mismatch
		h, err := ReadHeader(bytes.NewReader(dev), testDevSize)
		if err != nil {
			t.Fatal(err)
		}
		if h.Used != Secondary || !strings.Contains(h.Damaged[Primary], "checksum mismatch") {
			t.Fatalf("used %s, damaged %v", h.Used, h.Damaged)
		}
	})
	t.Run("PrimaryMagicGone", func(t *testing.T) {
		dev := testDevice(js)
		clear(dev[:4096])
		h, err := ReadHeader(bytes.NewReader(dev), testDevSize)
		if err != nil {
			t.Fatal(err)
		}
		if h.Used != Secondary || h.Damaged[Primary] == "" {
			t.Fatalf("used %s, damaged %v", h.Used, h.Damaged)
		}
	})
	t.Run("SecondaryNewer", func(t *testing.T) {
		dev := testDevice(js)
		writeCopy(dev, testHdrSize, magicSecondary, testHdrSize, 9, js)
		h, err := ReadHeader(bytes.NewReader(dev), testDevSize)
		if err != nil {
			t.Fatal(err)
		}
		if h.Used != Secondary || h.SeqID != 9 || !strings.Contains(h.Damaged[Primary], "stale") {
			t.Fatalf("used %s seq %d, damaged %v", h.Used, h.SeqID, h.Damaged)
		}
	})
	t.Run("SecondaryCorrupt", func(t *testing.T) {
		dev := testDevice(js)
		dev[testHdrSize+5000] ^= 1
		h, err := ReadHeader(bytes.NewReader(dev), testDevSize)
		if err != nil {
			t.Fatal(err)
		}
		if h.Used != Primary || !strings.Contains(h.Damaged[Secondary], "checksum") {
			t.Fatalf("used %s, damaged %v", h.Used, h.Damaged)
		}
	})
	t.Run("SameSeqDifferentUUID", func(t *testing.T) {
		dev := testDevice(js)
		copy(dev[168:], "99999999")
		writeCopy(dev, 0, magicPrimary, testHdrSize, 5, js)
		// writeCopy reset the uuid; set it again and re-checksum by hand
		copy(dev[168:], "99999999")
		clear(dev[448:512])
		sum := sha256.Sum256(dev[:testHdrSize])
		copy(dev[448:], sum[:])
		if _, err := ReadHeader(bytes.NewReader(dev), testDevSize); !errors.Is(err, ErrCorruptHeader) {
			t.Fatalf("err = %v, want ErrCorruptHeader", err)
		}
	})
}

func TestMalformedHeaders(t *testing.T) {
	base := testJSON(nil)
	repl := func(old, new string) func(string) string {
		return func(s string) string {
			if !strings.Contains(s, old) {
				panic("test JSON lacks " + old)
			}
			return strings.Replace(s, old, new, 1)
		}
	}
	both := func(js string) []byte { return testDevice(js) }
	cases := []struct {
		name    string
		dev     func() []byte
		size    int64 // 0 = len(dev)
		want    error
		message string
	}{
		{"empty", func() []byte { return nil }, 0, ErrNotLUKS2, "smaller than"},
		{"zeros", func() []byte { return make([]byte, 1<<20) }, 0, ErrNotLUKS2, "bad magic"},
		{"luks1", func() []byte {
			d := make([]byte, 1<<20)
			copy(d, magicPrimary)
			d[7] = 1
			return d
		}, 0, ErrNotLUKS2, "version 1"},
		{"truncated-in-binary-header", func() []byte { return both(base)[:3000] }, 0, ErrNotLUKS2, "smaller than"},
		{"truncated-in-json", func() []byte { return both(base)[:10000] }, 0, ErrCorruptHeader, "truncated"},
		{"truncated-before-keyslots-end", func() []byte { return both(base)[:1<<20] }, 0, ErrCorruptHeader, "outside"},
		{"checksum-both", func() []byte {
			d := both(base)
			d[4200] ^= 0x20
			d[testHdrSize+4200] ^= 0x20
			return d
		}, 0, ErrCorruptHeader, "checksum mismatch"},
		{"unknown-checksum-alg", func() []byte {
			d := both(base)
			copy(d[72:], "whirlpool\x00")
			copy(d[testHdrSize+72:], "whirlpool\x00")
			return d
		}, 0, ErrCorruptHeader, "checksum algorithm"},
		{"bad-hdr-size", func() []byte {
			d := both(base)
			binary.BigEndian.PutUint64(d[8:], 8<<20)
			binary.BigEndian.PutUint64(d[testHdrSize+8:], 8<<20)
			return d
		}, 0, ErrCorruptHeader, "metadata size"},
		{"json-invalid", func() []byte { return both(base[:200]) }, 0, ErrCorruptHeader, "invalid JSON"},
		{"json-not-object", func() []byte { return both(`[1,2,3]`) }, 0, ErrCorruptHeader, "invalid JSON"},
		{"json-empty", func() []byte { return both("") }, 0, ErrCorruptHeader, "empty"},
		{"json-missing-sections", func() []byte { return both(`{"keyslots":{}}`) }, 0, ErrCorruptHeader, "missing"},
		{"json-too-large-for-area", func() []byte {
			// A JSON area filled to the last byte with no terminator and
			// a json_size that claims more than the area holds.
			js := testJSON(repl(`"json_size":"12288"`, `"json_size":"1048576"`))
			return both(js + strings.Repeat(" ", testHdrSize-4096-len(js)))
		}, 0, ErrCorruptHeader, "json_size"},
		{"keyslots-size-huge", func() []byte {
			return both(testJSON(repl(`"keyslots_size":"4161536"`, `"keyslots_size":"1099511627776"`)))
		}, 0, ErrCorruptHeader, "keyslots_size"},
		{"segment-outside-device", func() []byte {
			return both(testJSON(repl(`"offset":"4194304","size":"dynamic"`, `"offset":"4194304","size":"8388608"`)))
		}, 0, ErrCorruptHeader, "outside the"},
		{"segment-offset-past-end", func() []byte {
			return both(testJSON(repl(`"offset":"4194304"`, `"offset":"16777216"`)))
		}, 0, ErrCorruptHeader, "outside the"},
		{"segment-inside-keyslots", func() []byte {
			return both(testJSON(repl(`"offset":"4194304"`, `"offset":"1048576"`)))
		}, 0, ErrCorruptHeader, "inside the header"},
		{"keyslot-outside-area", func() []byte {
			return both(testJSON(repl(`"offset":"32768","size":"258048"`, `"offset":"4190208","size":"258048"`)))
		}, 0, ErrCorruptHeader, "outside the keyslots area"},
		{"keyslot-in-header", func() []byte {
			return both(testJSON(repl(`"offset":"32768","size":"258048"`, `"offset":"0","size":"258048"`)))
		}, 0, ErrCorruptHeader, "outside the keyslots area"},
		{"keyslots-overlap", func() []byte {
			js := testJSON(nil)
			i := strings.Index(js, `"0":{"type":"luks2"`)
			j := strings.Index(js, `},"tokens"`)
			slot := js[i+4 : j]
			slot1 := strings.Replace(slot, `"offset":"32768"`, `"offset":"65536"`, 1)
			js = js[:j] + `,"1":` + slot1 + js[j:]
			return both(js)
		}, 0, ErrCorruptHeader, "overlaps"},
		{"stripes-do-not-fit", func() []byte {
			return both(testJSON(repl(`"stripes":4000`, `"stripes":40000`)))
		}, 0, ErrCorruptHeader, "does not fit"},
		{"negative-offset", func() []byte {
			return both(testJSON(repl(`"offset":"32768"`, `"offset":"-512"`)))
		}, 0, ErrCorruptHeader, "not a non-negative"},
		{"bad-sector-size", func() []byte {
			return both(testJSON(repl(`"sector_size":512`, `"sector_size":520`)))
		}, 0, ErrCorruptHeader, "sector_size"},
		{"digest-missing-keyslot", func() []byte {
			return both(testJSON(repl(`"keyslots":["0"]`, `"keyslots":["7"]`)))
		}, 0, ErrCorruptHeader, "missing keyslot"},
		{"null-keyslot", func() []byte {
			return both(testJSON(repl(`"keyslots":{"0":{`, `"keyslots":{"1":null,"0":{`)))
		}, 0, ErrCorruptHeader, "null"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dev := tc.dev()
			size := tc.size
			if size == 0 {
				size = int64(len(dev))
			}
			before := append([]byte(nil), dev...)
			h, err := ReadHeader(bytes.NewReader(dev), size)
			if err == nil {
				t.Fatalf("accepted: %+v", h)
			}
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.message) {
				t.Fatalf("err = %v\nwant %v mentioning %q", err, tc.want, tc.message)
			}
			if !bytes.Equal(before, dev) {
				t.Fatal("ReadHeader changed its input")
			}
		})
	}
}

func TestLayoutRefusals(t *testing.T) {
	for name, mod := range map[string]func(string) string{
		"two-segments": func(s string) string {
			return strings.Replace(s, `"segments":{"0":{`, `"segments":{"1":{"type":"linear","offset":"6291456","size":"dynamic"},"0":{`, 1)
		},
		"iv-tweak": func(s string) string { return strings.Replace(s, `"iv_tweak":"0"`, `"iv_tweak":"8"`, 1) },
		"unbound": func(s string) string {
			return strings.Replace(s, `"segments":["0"]`, `"segments":[]`, 1)
		},
	} {
		t.Run(name, func(t *testing.T) {
			dev := testDevice(testJSON(mod))
			h, err := ReadHeader(bytes.NewReader(dev), testDevSize)
			if err != nil {
				if name == "two-segments" {
					return // refused even earlier: also fine
				}
				t.Fatal(err)
			}
			if l, err := h.Layout(testDevSize); err == nil {
				t.Fatalf("layout accepted: %+v", l)
			}
		})
	}
}

// zeroPadded is a device of size bytes whose start is data and rest zeros,
// so fuzzed headers can describe areas beyond the input.
type zeroPadded struct{ data []byte }

func (z zeroPadded) ReadAt(p []byte, off int64) (int, error) {
	clear(p)
	if off < int64(len(z.data)) {
		copy(p, z.data[off:])
	}
	return len(p), nil
}

func trimZeros(b []byte) []byte { return bytes.TrimRight(b, "\x00") }

func FuzzReadHeader(f *testing.F) {
	// Seeds are cut after the primary's JSON: the rest reads as zeros, and
	// short inputs keep the fuzzer fast. The secondary copy is found by search.
	f.Add(trimZeros(testDevice(testJSON(nil))[:2*testHdrSize]), int64(testDevSize))
	f.Add(trimZeros(testDevice(`{"keyslots":{},"segments":{},"digests":{},"config":{"json_size":"12288","keyslots_size":"0"}}`)[:testHdrSize]), int64(testDevSize))
	if real, err := os.ReadFile("testdata/cryptsetup-4mib-header.bin"); err == nil {
		f.Add(trimZeros(real[:testHdrSize]), int64(testDevSize))
	}
	f.Fuzz(func(t *testing.T, data []byte, size int64) {
		if size < 0 || size > 1<<40 {
			size = int64(len(data))
		}
		h, err := ReadHeader(zeroPadded{data}, size)
		if err != nil {
			if !errors.Is(err, ErrNotLUKS2) && !errors.Is(err, ErrCorruptHeader) {
				t.Fatalf("error without a category: %v", err)
			}
			return
		}
		d := &Dump{Used: h.Used, Damaged: h.Damaged, Header: h}
		for _, out := range []string{h.LuksDumpText(), d.Text("dev")} {
			for _, r := range out {
				if r < 0x20 && r != '\n' && r != '\t' || r >= 0x7f && r <= 0x9f {
					t.Fatalf("printed header holds the control character %U:\n%q", r, out)
				}
			}
		}
		if l, err := h.Layout(size); err == nil {
			if verr := l.Validate(); verr != nil {
				t.Fatalf("Layout returned an invalid layout: %v", verr)
			}
			if _, err := CheckCompatible(l, size); err != nil && l.DeviceSize() == size {
				_ = fmt.Sprint(err)
			}
		}
		// The image keeps what Unlock reads: the header again, and every
		// keyslot area's material.
		if im, err := ReadHeaderImage(zeroPadded{data}, size, int64(len(data)%(64<<10))); err == nil {
			if _, err := ReadHeader(im, size); err != nil {
				t.Fatalf("the header does not read again from its image: %v", err)
			}
			ids, err := im.h.dataKeyslots()
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range ids {
				ks := im.h.Meta.Keyslots[id]
				n, _ := afReadLen(ks)
				if _, err := im.ReadAt(make([]byte, n), ks.Area.Offset); err != nil {
					t.Fatalf("keyslot %s's material is not in the image: %v", id, err)
				}
			}
		}
	})
}
