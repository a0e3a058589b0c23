package luks

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

func TestParseCryptTable(t *testing.T) {
	c, err := ParseCryptTable("0 32768 crypt aes-xts-plain64 :64:logon:cryptsetup:1234-d0 0 7:0 32768 1 allow_discards")
	if err != nil {
		t.Fatal(err)
	}
	if c.Sectors != 32768 || c.Offset != 32768 || c.Device != "7:0" || c.SectorSize != 512 || !c.AllowDiscards() || c.Cipher != "aes-xts-plain64" {
		t.Fatalf("%+v", c)
	}
	c, err = ParseCryptTable("0 8192 crypt aes-xts-plain64 :64:logon:cryptsetup:x-d0 0 253:1 8192 2 allow_discards sector_size:4096")
	if err != nil || c.SectorSize != 4096 || c.Offset != 8192 {
		t.Fatalf("%+v %v", c, err)
	}
	c, err = ParseCryptTable("0 8 crypt aes-xts-plain64 0000 0 7:0 4096")
	if err != nil || c.AllowDiscards() {
		t.Fatalf("%+v %v", c, err)
	}
	for _, bad := range []string{"", "0 8 linear 7:0 0", "0 x crypt a k 0 7:0 1", "0 8 crypt a k 0 7:0 -1",
		"0 8 crypt a k 0 7:0 1 2 allow_discards", "0 8 crypt a k 0 7:0 1 1 sector_size:x", "0 0 crypt a k 0 7:0 1"} {
		if c, err := ParseCryptTable(bad); err == nil {
			t.Errorf("%q parsed as %+v", bad, c)
		}
	}
	// A table that printed the raw key never puts it in an error.
	_, err = ParseCryptTable("0 8 crypt aes-xts-plain64 deadbeefcafe 0 7:0 1 9 x")
	if err == nil || strings.Contains(err.Error(), "deadbeef") {
		t.Fatalf("error %v", err)
	}
}

func TestCheckMapping(t *testing.T) {
	l := Layout{DataOffset: 4 << 20, SectorSize: 512, Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: 28 << 20}
	ok := "0 57344 crypt aes-xts-plain64 :64:logon:cryptsetup:u-d0 0 7:0 8192 1 allow_discards"
	if err := checkMapping(ok, l, l.PayloadSize); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{
		"0 57344 crypt aes-xts-plain64 k 0 7:0 32768 1 allow_discards", // 16 MiB offset: a local default
		"0 57000 crypt aes-xts-plain64 k 0 7:0 8192 1 allow_discards",  // wrong size
		"0 57344 crypt aes-xts-plain64 k 0 7:0 8192",                   // no discards
		"0 57344 crypt aes-xts-plain64 k 0 7:0 8192 2 allow_discards sector_size:1024",
	} {
		if err := checkMapping(bad, l, l.PayloadSize); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// fourMiBHeader is the layout older cryptsetup releases wrote by default
// (data at 4 MiB), unlike this one's 16 MiB: the carried layout must win.
var fourMiBHeader = FormatOptions{MetadataSize: 16 << 10, KeyslotsSize: 4<<20 - 32<<10, FastKDF: true}

// TestOpenKernelRefusesMismatchedLayout runs on any host with cryptsetup:
// the header check happens before cryptsetup is asked to open anything.
func TestOpenKernelRefusesMismatchedLayout(t *testing.T) {
	path, keyFile, _ := formatVolume(t, 32<<20, fourMiBHeader)
	l := headerLayout(t, path)
	if l.DataOffset != 4<<20 {
		t.Fatalf("data offset %d, want 4 MiB", l.DataOffset)
	}
	for name, mutate := range map[string]func(*Layout){
		"data offset":    func(l *Layout) { l.DataOffset = 16 << 20; l.PayloadSize = 16 << 20 },
		"UUID":           func(l *Layout) { l.UUID = "00000000-0000-0000-0000-000000000000" },
		"plaintext size": func(l *Layout) { l.PayloadSize -= 1 << 20 },
		"sector size":    func(l *Layout) { l.SectorSize = 4608 - l.SectorSize }, // 512 <-> 4096
	} {
		bad := l
		mutate(&bad)
		_, err := OpenKernel(context.Background(), path, "ferry-never-"+randHex(), bad, keyFile)
		if err == nil || !strings.Contains(err.Error(), "carried layout") && !strings.Contains(err.Error(), "larger than") {
			t.Errorf("%s changed: %v", name, err)
		}
	}
	if _, err := OpenKernel(context.Background(), path, "a b", l, keyFile); err == nil {
		t.Error("a name with a space was accepted")
	}
}

func headerLayout(t *testing.T, path string) Layout {
	t.Helper()
	d, err := blockdev.OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	h, err := ReadHeader(d, d.Size())
	if err != nil {
		t.Fatal(err)
	}
	l, err := h.Layout(d.Size())
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func randHex() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// needDMCrypt skips on hosts without device-mapper; inside the test VM
// (FERRY_IN_VM=1) its absence is a failure.
func needDMCrypt(t *testing.T) {
	t.Helper()
	needCryptsetup(t)
	out, err := exec.Command("dmsetup", "targets").CombinedOutput()
	testenv.Guest(t, fmt.Sprintf("device-mapper with dm-crypt (dmsetup targets: %v %s)", err, bytes.TrimSpace(out)),
		err == nil && bytes.Contains(out, []byte("crypt ")))
}

func TestKernelOpenCarriedLayout(t *testing.T) {
	needDMCrypt(t)
	ctx := context.Background()
	path, keyFile, pass := formatVolume(t, 32<<20, fourMiBHeader)
	carried := headerLayout(t, path)

	// Written through ferry's userspace view...
	want := make([]byte, carried.PayloadSize)
	rand.Read(want)
	f, err := blockdev.OpenFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	v, _, err := OpenHeaderView(f, pass)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}

	loop, err := exec.Command("losetup", "-f", "--show", path).Output()
	if err != nil {
		t.Fatalf("losetup: %v", err)
	}
	dev := strings.TrimSpace(string(loop))
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	name := "ferry-crypt-" + randHex()
	t.Cleanup(func() { _ = CloseKernel(context.Background(), name) })

	mapper, err := OpenKernel(ctx, dev, name, carried, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	table, _ := dmTable(ctx, name)
	c, err := ParseCryptTable(table)
	if err != nil {
		t.Fatal(err)
	}
	if c.Offset != 8192 || !c.AllowDiscards() || c.Sectors*512 != carried.PayloadSize {
		t.Fatalf("mapping %+v: want ciphertext at sector 8192 (4 MiB), discards allowed, %d bytes", c, carried.PayloadSize)
	}
	// ...reads back identically through dm-crypt.
	got, err := os.ReadFile(mapper)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("dm-crypt reads different plaintext than ferry's view wrote")
	}
	// And the other way: dm-crypt writes, the userspace view reads.
	w := make([]byte, 1<<20)
	rand.Read(w)
	mf, err := os.OpenFile(mapper, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mf.WriteAt(w, 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := mf.Sync(); err != nil {
		t.Fatal(err)
	}
	mf.Close()
	copy(want[2<<20:], w)
	if out, err := exec.Command("blkdiscard", "-o", "0", "-l", "65536", mapper).CombinedOutput(); err != nil {
		t.Fatalf("discard through dm-crypt: %v %s", err, out)
	}
	// Opening again adopts the live mapping.
	if again, err := OpenKernel(ctx, dev, name, carried, keyFile); err != nil || again != mapper {
		t.Fatalf("reopen: %q %v", again, err)
	}
	if err := CloseKernel(ctx, name); err != nil {
		t.Fatal(err)
	}
	if _, err := dmTable(ctx, name); err == nil {
		t.Fatal("mapping still present after CloseKernel")
	}
	if err := CloseKernel(ctx, name); err != nil {
		t.Fatalf("second close: %v", err)
	}

	f, err = blockdev.OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	v, _, err = OpenHeaderView(f, pass)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	back := make([]byte, len(want))
	if _, err := v.ReadAt(back, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back[65536:], want[65536:]) {
		t.Fatal("ferry's view reads different plaintext than dm-crypt wrote")
	}
}

func FuzzParseCryptTable(f *testing.F) {
	f.Add("0 32768 crypt aes-xts-plain64 :64:logon:cryptsetup:1234-d0 0 7:0 32768 1 allow_discards")
	f.Add("0 8192 crypt aes-xts-plain64 :64:logon:cryptsetup:x-d0 0 253:1 8192 2 allow_discards sector_size:4096")
	f.Add("0 8 crypt aes-xts-plain64 0000 0 7:0 4096")
	f.Fuzz(func(t *testing.T, line string) {
		c, err := ParseCryptTable(line)
		if err != nil {
			return
		}
		if c.Sectors <= 0 || c.Offset < 0 || c.SectorSize < 512 {
			t.Fatalf("%q accepted as %+v", line, c)
		}
		if f := strings.Fields(line); c.Cipher != f[3] || c.Device != f[6] || len(c.Features) != max(0, len(f)-9) {
			t.Fatalf("%q parsed as %+v", line, c)
		}
	})
}
