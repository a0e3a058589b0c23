package luks

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/ferry-dev/ferry/blockdev"
)

// A header image read from a volume opens the same view as the volume's
// own header, reading nothing of the device's header or keyslots; it
// refuses a carried layout that differs, a wrong passphrase and a device of
// another size, and serves no byte it did not read.
func TestHeaderImageOpensWithoutReadingTheHeader(t *testing.T) {
	path, _, pass := smallVolume(t)
	l := headerLayout(t, path)
	f, err := blockdev.OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, ahead := range []int64{0, 2*l.MetadataSize + 256<<10} {
		t.Run(fmt.Sprintf("ahead %d", ahead), func(t *testing.T) { testHeaderImage(t, f, l, pass, ahead) })
	}
}

func testHeaderImage(t *testing.T, f blockdev.Device, l Layout, pass []byte, ahead int64) {
	src := &countingDev{Device: f}
	im, err := ReadHeaderImage(src, f.Size(), ahead)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Wipe()
	if want := map[bool]int{true: 5, false: 1}[ahead == 0]; len(src.reads) != want {
		t.Fatalf("the image took %d reads %v, want %d", len(src.reads), src.reads, want)
	}

	dev := &countingDev{Device: f}
	v, err := im.OpenCarriedView(dev, l, pass)
	if err != nil {
		t.Fatalf("open from the image: %v", err)
	}
	defer v.Close()
	if dev.touched(0, l.DataOffset) {
		t.Fatalf("opening from the image read the device's header or keyslots: %v", dev.reads)
	}
	ref, _, err := OpenHeaderView(f, pass)
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	a, b := make([]byte, 64<<10), make([]byte, 64<<10)
	if _, err := v.ReadAt(a, 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := ref.ReadAt(b, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatal("the view opened from the image reads other plaintext than the header's own")
	}

	bad := l
	bad.UUID = "00000000-0000-0000-0000-000000000000"
	if v, err := im.OpenCarriedView(f, bad, pass); err == nil || !strings.Contains(err.Error(), "carried layout") {
		if v != nil {
			v.Close()
		}
		t.Fatalf("another volume's layout: %v, want a layout refusal", err)
	}
	if _, err := im.OpenCarriedView(f, l, []byte("not the passphrase")); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("wrong passphrase: %v, want ErrWrongPassphrase", err)
	}
	if _, err := im.OpenCarriedView(blockdev.NewMem(f.Size()+4096), l, pass); err == nil || !strings.Contains(err.Error(), "device of") {
		t.Fatalf("a device of another size: %v, want a refusal", err)
	}
	if _, err := im.ReadAt(make([]byte, 512), l.DataOffset); !errors.Is(err, ErrNotInImage) {
		t.Fatalf("a read past the header: %v, want ErrNotInImage", err)
	}
}

// A header whose keyslots are dearer than the unlock budget is refused
// before any keyslot's material is read into an image.
func TestHeaderImageRefusesCostlyKeyslotsBeforeReadingThem(t *testing.T) {
	path, _, _ := smallVolume(t)
	l := headerLayout(t, path)
	editHeader(t, path, func(m map[string]any) { obj(m, "keyslots", "0", "kdf")["iterations"] = 1 << 30 })
	f, err := blockdev.OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dev := &countingDev{Device: f}
	if _, err := ReadHeaderImage(dev, f.Size(), 0); err == nil || !strings.Contains(err.Error(), "budget") {
		t.Fatalf("ReadHeaderImage = %v, want a budget refusal", err)
	}
	if dev.touched(2*l.MetadataSize, l.DataOffset) {
		t.Fatal("the keyslot area was read before the refusal")
	}
}
