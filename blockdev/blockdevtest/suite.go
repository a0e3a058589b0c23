// Package blockdevtest is the conformance suite every blockdev.Device
// implementation runs (file, memory, clone engine, LUKS view, iSCSI LUN):
// written once, so the layers agree on what a device does.
package blockdevtest

import (
	"bytes"
	"errors"
	"math/rand"
	"testing"

	"github.com/ferry-dev/ferry/blockdev"
)

// Options describe what the implementation under test supports.
type Options struct {
	// ReadOnly devices must refuse WriteAt and Discard with blockdev.ErrReadOnly.
	ReadOnly bool
	// DiscardZeroes: a discarded range reads back as zeros.
	DiscardZeroes bool
	// Initial, if set, is the content the fresh device must have (read-only devices).
	Initial []byte
}

// Factory makes a fresh device of the given size for one subtest.
type Factory func(t *testing.T, size int64) blockdev.Device

const suiteSize = 1 << 20

// Run runs the conformance suite.
func Run(t *testing.T, newDev Factory, opt Options) {
	t.Run("Size", func(t *testing.T) {
		d := newDev(t, suiteSize)
		defer d.Close()
		if d.Size() != suiteSize {
			t.Fatalf("Size() = %d, want %d", d.Size(), suiteSize)
		}
	})
	t.Run("ReadPastEndRefused", func(t *testing.T) {
		d := newDev(t, suiteSize)
		defer d.Close()
		buf := make([]byte, 4096)
		if _, err := d.ReadAt(buf, suiteSize-2048); !errors.Is(err, blockdev.ErrOutOfRange) {
			t.Fatalf("read across end: err = %v, want ErrOutOfRange", err)
		}
		if _, err := d.ReadAt(buf, -4096); !errors.Is(err, blockdev.ErrOutOfRange) {
			t.Fatalf("read at negative offset: err = %v, want ErrOutOfRange", err)
		}
	})
	if opt.Initial != nil {
		t.Run("InitialContent", func(t *testing.T) {
			d := newDev(t, suiteSize)
			defer d.Close()
			got := make([]byte, d.Size())
			if _, err := d.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, opt.Initial[:len(got)]) {
				t.Fatal("content differs from the expected initial content")
			}
		})
	}
	if opt.ReadOnly {
		t.Run("WritesRefused", func(t *testing.T) {
			d := newDev(t, suiteSize)
			defer d.Close()
			if _, err := d.WriteAt(make([]byte, 512), 0); !errors.Is(err, blockdev.ErrReadOnly) {
				t.Fatalf("write: err = %v, want ErrReadOnly", err)
			}
			if err := d.Discard(0, 4096); !errors.Is(err, blockdev.ErrReadOnly) {
				t.Fatalf("discard: err = %v, want ErrReadOnly", err)
			}
		})
		return
	}
	t.Run("WriteReadBack", func(t *testing.T) {
		d := newDev(t, suiteSize)
		defer d.Close()
		rng := rand.New(rand.NewSource(1))
		model := make([]byte, suiteSize)
		if _, err := d.ReadAt(model, 0); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 200; i++ {
			off := rng.Int63n(suiteSize - 8192)
			off &^= 511
			n := 512 * (1 + rng.Intn(16))
			p := make([]byte, n)
			rng.Read(p)
			if _, err := d.WriteAt(p, off); err != nil {
				t.Fatalf("write %d at %d: %v", n, off, err)
			}
			copy(model[off:], p)
		}
		if err := d.Flush(); err != nil {
			t.Fatalf("flush: %v", err)
		}
		got := make([]byte, suiteSize)
		if _, err := d.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model) {
			t.Fatal("device content differs from the model after random writes")
		}
	})
	t.Run("WritePastEndRefused", func(t *testing.T) {
		d := newDev(t, suiteSize)
		defer d.Close()
		if _, err := d.WriteAt(make([]byte, 4096), suiteSize-512); !errors.Is(err, blockdev.ErrOutOfRange) {
			t.Fatalf("write across end: err = %v, want ErrOutOfRange", err)
		}
	})
	if opt.DiscardZeroes {
		t.Run("DiscardZeroes", func(t *testing.T) {
			d := newDev(t, suiteSize)
			defer d.Close()
			p := bytes.Repeat([]byte{0xAB}, 64<<10)
			if _, err := d.WriteAt(p, 0); err != nil {
				t.Fatal(err)
			}
			if err := d.Discard(16<<10, 32<<10); err != nil {
				t.Fatalf("discard: %v", err)
			}
			got := make([]byte, 64<<10)
			if _, err := d.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			want := append([]byte(nil), p...)
			clear(want[16<<10 : 48<<10])
			if !bytes.Equal(got, want) {
				t.Fatal("discarded range does not read as zeros, or neighbours changed")
			}
		})
	}
	t.Run("ClosedRefuses", func(t *testing.T) {
		d := newDev(t, suiteSize)
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := d.ReadAt(make([]byte, 512), 0); err == nil {
			t.Fatal("read after close succeeded")
		}
	})
}
