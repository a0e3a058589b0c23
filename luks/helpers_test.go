package luks

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferry-dev/ferry/internal/testenv"
)

func needCryptsetup(t testing.TB) {
	t.Helper()
	testenv.Tools(t, "apt-get install cryptsetup-bin (scripts/packages.txt)", "cryptsetup")
}

// newKeyFile writes a random 32-byte passphrase, hex-encoded like the key
// store hands it out, and returns its path and content.
func newKeyFile(t testing.TB) (string, []byte) {
	t.Helper()
	raw := make([]byte, 32)
	rand.Read(raw)
	pass := []byte(hex.EncodeToString(raw))
	path := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(path, pass, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, pass
}

// formatVolume makes a size-byte file and luksFormats it.
func formatVolume(t testing.TB, size int64, opts FormatOptions) (path, keyFile string, pass []byte) {
	t.Helper()
	needCryptsetup(t)
	path = filepath.Join(t.TempDir(), "vol.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	keyFile, pass = newKeyFile(t)
	if err := Format(context.Background(), path, keyFile, opts); err != nil {
		t.Fatal(err)
	}
	return path, keyFile, pass
}

func cryptsetup(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command("cryptsetup", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("cryptsetup %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// cryptsetupVolumeKey is the volume key as `luksDump --dump-volume-key` prints it.
func cryptsetupVolumeKey(t testing.TB, path, keyFile string) []byte {
	t.Helper()
	out := cryptsetup(t, "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile, path)
	i := strings.Index(out, "MK dump:")
	if i < 0 {
		t.Fatalf("no MK dump in luksDump output")
	}
	hexStr := strings.Join(strings.Fields(out[i+len("MK dump:"):]), "")
	k, err := hex.DecodeString(hexStr)
	if err != nil {
		t.Fatalf("parse MK dump: %v", err)
	}
	return k
}
