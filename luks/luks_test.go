package luks

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/ferry-dev/ferry/blockdev"
)

// layoutCases are the header shapes the issue asks about, all made by cryptsetup.
var layoutCases = []struct {
	name       string
	size       int64
	opts       FormatOptions
	wantOffset int64 // data offset the layout must report
	wantMeta   int64
	wantKS     int64
}{
	{"default-16MiB", 20 << 20, FormatOptions{FastKDF: true, SectorSize: 512}, 16 << 20, 16384, 16744448},
	{"luks2.0-4MiB", 8 << 20, FormatOptions{FastKDF: true, MetadataSize: 16384, KeyslotsSize: 4161536, SectorSize: 512}, 4 << 20, 16384, 4161536},
	{"metadata-64KiB", 20 << 20, FormatOptions{FastKDF: true, MetadataSize: 64 << 10, SectorSize: 512}, 16 << 20, 64 << 10, 16<<20 - 128<<10},
	{"keyslots-1MiB", 8 << 20, FormatOptions{FastKDF: true, KeyslotsSize: 1 << 20, SectorSize: 512}, 2 << 20, 16384, 1 << 20}, // data aligned up to 1 MiB
	{"sector-4096", 20 << 20, FormatOptions{FastKDF: true, SectorSize: 4096}, 16 << 20, 16384, 16744448},
	{"argon2id", 8 << 20, FormatOptions{FastKDF: true, PBKDF: "argon2id", MetadataSize: 16384, KeyslotsSize: 4161536, SectorSize: 512}, 4 << 20, 16384, 4161536},
	{"argon2i", 8 << 20, FormatOptions{FastKDF: true, PBKDF: "argon2i", MetadataSize: 16384, KeyslotsSize: 4161536, SectorSize: 4096}, 4 << 20, 16384, 4161536},
}

func TestHeaderMatchesCryptsetup(t *testing.T) {
	for _, tc := range layoutCases {
		t.Run(tc.name, func(t *testing.T) {
			path, keyFile, pass := formatVolume(t, tc.size, tc.opts)
			f, err := blockdev.OpenFile(path, true)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			h, err := ReadHeader(f, f.Size())
			if err != nil {
				t.Fatal(err)
			}
			if h.Used != Primary || len(h.Damaged) != 0 {
				t.Fatalf("fresh header: used %s, damaged %v", h.Used, h.Damaged)
			}
			want := cryptsetup(t, "luksDump", path)
			if got := h.LuksDumpText(); got != want {
				t.Fatalf("dump differs from cryptsetup luksDump\n--- ferry\n%s\n--- cryptsetup\n%s", got, want)
			}
			l, err := h.Layout(f.Size())
			if err != nil {
				t.Fatal(err)
			}
			sector := tc.opts.SectorSize
			wantL := Layout{UUID: h.UUID, DataOffset: tc.wantOffset, MetadataSize: tc.wantMeta, KeyslotsSize: tc.wantKS,
				SectorSize: sector, Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: tc.size - tc.wantOffset}
			if l != wantL {
				t.Fatalf("layout %+v\nwant   %+v", l, wantL)
			}
			vk, err := Unlock(f, f.Size(), pass)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(vk.Bytes(), cryptsetupVolumeKey(t, path, keyFile)) {
				t.Fatal("unlocked volume key differs from cryptsetup luksDump --dump-volume-key")
			}
			if _, err := Unlock(f, f.Size(), append(pass, 'x')); !errors.Is(err, ErrWrongPassphrase) {
				t.Fatalf("wrong passphrase: err = %v, want ErrWrongPassphrase", err)
			}
			if n, err := CheckCompatible(l, f.Size()); err != nil || n != l.PayloadSize {
				t.Fatalf("CheckCompatible = %d, %v; want %d", n, err, l.PayloadSize)
			}
		})
	}
}

// A second keyslot, a label (which bumps the epoch) and a priority: the
// dump still matches, and both passphrases unlock the same key.
func TestSeveralKeyslots(t *testing.T) {
	path, keyFile, pass := formatVolume(t, 8<<20, layoutCases[1].opts)
	key2, pass2 := newKeyFile(t)
	cryptsetup(t, "luksAddKey", "--batch-mode", "--key-file", keyFile, "--pbkdf", "argon2id",
		"--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "1", path, key2)
	cryptsetup(t, "config", "--label", "ferry-vol", "--priority", "prefer", "--key-slot", "1", path)
	f, err := blockdev.OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := ReadHeader(f, f.Size())
	if err != nil {
		t.Fatal(err)
	}
	if got, want := h.LuksDumpText(), cryptsetup(t, "luksDump", path); got != want {
		t.Fatalf("dump differs\n--- ferry\n%s\n--- cryptsetup\n%s", got, want)
	}
	k1, err := h.Unlock(f, pass)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := h.Unlock(f, pass2)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k1.Bytes(), k2.Bytes()) {
		t.Fatal("the two keyslots give different volume keys")
	}
}

// Data encrypted by cryptsetup's own userspace cipher (offline reencrypt
// --encrypt, which must produce what dm-crypt reads) reads back as the
// original plaintext through the view: proves the IV convention for 512 and
// 4096-byte sectors.
func TestViewReadsCryptsetupCiphertext(t *testing.T) {
	needCryptsetup(t)
	for _, sector := range []int{512, 4096} {
		t.Run(strconv.Itoa(sector), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "plain.img")
			plain := make([]byte, 2<<20)
			rand.Read(plain)
			if err := os.WriteFile(path, plain, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(path, 12<<20); err != nil {
				t.Fatal(err)
			}
			keyFile, pass := newKeyFile(t)
			// --reduce-device-size makes room for the header: data shifts by half of it.
			cryptsetup(t, "reencrypt", "--encrypt", "--type", "luks2", "--batch-mode", "--key-file", keyFile,
				"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--sector-size", strconv.Itoa(sector),
				"--luks2-metadata-size", "16384", "--luks2-keyslots-size", "4161536", "--reduce-device-size", "8M", path)
			f, err := blockdev.OpenFile(path, false)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			v, l, err := OpenHeaderView(f, pass)
			if err != nil {
				t.Fatal(err)
			}
			defer v.Close()
			if l.SectorSize != sector || l.DataOffset != 4<<20 {
				t.Fatalf("layout %+v: want sector %d, data offset 4 MiB", l, sector)
			}
			got := make([]byte, len(plain))
			if _, err := v.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatal("plaintext through the view differs from what cryptsetup encrypted")
			}
		})
	}
}

// Data written through the view is what cryptsetup decrypts (offline
// reencrypt --decrypt): the write path matches cryptsetup's cipher and IVs.
func TestCryptsetupReadsViewWrites(t *testing.T) {
	needCryptsetup(t)
	for _, sector := range []int{512, 4096} {
		t.Run(strconv.Itoa(sector), func(t *testing.T) {
			path, keyFile, pass := formatVolume(t, 8<<20, FormatOptions{FastKDF: true, MetadataSize: 16384, KeyslotsSize: 4161536, SectorSize: sector})
			f, err := blockdev.OpenFile(path, false)
			if err != nil {
				t.Fatal(err)
			}
			v, l, err := OpenHeaderView(f, pass)
			if err != nil {
				t.Fatal(err)
			}
			plain := make([]byte, l.PayloadSize)
			rand.Read(plain)
			if _, err := v.WriteAt(plain, 0); err != nil {
				t.Fatal(err)
			}
			// An unaligned write on top, read-modify-write inside sectors.
			patch := []byte("ferry was here, unaligned")
			if _, err := v.WriteAt(patch, 1000); err != nil {
				t.Fatal(err)
			}
			copy(plain[1000:], patch)
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
			v.Close()
			f.Close()
			hdr := filepath.Join(t.TempDir(), "detached.hdr")
			cryptsetup(t, "reencrypt", "--decrypt", "--batch-mode", "--key-file", keyFile, "--header", hdr, "--force-offline-reencrypt", path)
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[:len(plain)], plain) {
				t.Fatal("cryptsetup decrypted something else than what the view wrote")
			}
		})
	}
}

func TestFormatRefusesWithoutCryptsetup(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	err := Format(t.Context(), "/nonexistent", "/nonexistent", FormatOptions{})
	if err == nil || !errors.Is(err, exec.ErrNotFound) {
		t.Fatalf("err = %v, want a not-found error naming cryptsetup", err)
	}
}
