package luks

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// skipWithoutDMCrypt skips where device-mapper with dm-crypt is missing (the
// development machines' kernel); inside the test VM (FERRY_IN_VM=1, where
// integration/vm runs `luks.test -test.run Kernel`) that is a failure.
func skipWithoutDMCrypt(t *testing.T) {
	t.Helper()
	needCryptsetup(t)
	out, err := exec.Command("dmsetup", "targets").CombinedOutput()
	testenv.Guest(t, fmt.Sprintf("root and device-mapper with dm-crypt (dmsetup targets: %v %s)", err, bytes.TrimSpace(out)),
		err == nil && bytes.Contains(out, []byte("crypt ")) && os.Geteuid() == 0)
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// TestKernelDMCryptSectorSizes: what ferry's userspace view writes, dm-crypt
// (opened by plain cryptsetup, no ferry code) reads, and the other way
// round, for 512- and 4096-byte encryption sectors: the proof that the
// view's IV convention (plain64 in 512-byte units, no iv_large_sectors) is
// the kernel's.
func TestKernelDMCryptSectorSizes(t *testing.T) {
	skipWithoutDMCrypt(t)
	for _, sector := range []int{512, 4096} {
		t.Run(strconv.Itoa(sector), func(t *testing.T) {
			path, keyFile, pass := formatVolume(t, 8<<20,
				FormatOptions{FastKDF: true, MetadataSize: 16384, KeyslotsSize: 4161536, SectorSize: sector})

			f, err := blockdev.OpenFile(path, false)
			if err != nil {
				t.Fatal(err)
			}
			v, l, err := OpenHeaderView(f, pass)
			if err != nil {
				t.Fatal(err)
			}
			fromFerry := make([]byte, l.PayloadSize)
			rand.Read(fromFerry)
			if _, err := v.WriteAt(fromFerry, 0); err != nil {
				t.Fatal(err)
			}
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			v.Close()
			f.Close()

			loop := mustRun(t, "losetup", "--find", "--show", path)
			attached := true
			detach := func() {
				if attached {
					attached = false
					exec.Command("losetup", "-d", loop).Run()
				}
			}
			t.Cleanup(detach)
			suffix := make([]byte, 4)
			rand.Read(suffix)
			name := "ferry-luks-" + hex.EncodeToString(suffix)
			mustRun(t, "cryptsetup", "open", "--type", "luks2", "--key-file", keyFile, loop, name)
			opened := true
			closeMapping := func() {
				if opened {
					opened = false
					exec.Command("cryptsetup", "close", name).Run()
				}
			}
			t.Cleanup(closeMapping)
			if table, err := exec.Command("dmsetup", "table", name).CombinedOutput(); err == nil {
				t.Logf("dm table (the key is in the kernel keyring, not shown): %s", bytes.TrimSpace(table))
			}

			m, err := os.OpenFile("/dev/mapper/"+name, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			got := make([]byte, l.PayloadSize)
			if _, err := io.ReadFull(m, got); err != nil {
				t.Fatalf("read dm-crypt device: %v", err)
			}
			if !bytes.Equal(got, fromFerry) {
				t.Fatal("dm-crypt reads something else than what ferry's view wrote")
			}

			fromKernel := make([]byte, l.PayloadSize)
			rand.Read(fromKernel)
			if _, err := m.WriteAt(fromKernel, 0); err != nil {
				t.Fatal(err)
			}
			if err := m.Sync(); err != nil {
				t.Fatal(err)
			}
			m.Close()
			closeMapping()
			detach()

			f, err = blockdev.OpenFile(path, true)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			v, _, err = OpenHeaderView(f, pass)
			if err != nil {
				t.Fatal(err)
			}
			defer v.Close()
			if _, err := v.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, fromKernel) {
				t.Fatal("ferry's view reads something else than what dm-crypt wrote")
			}
		})
	}
}
