package luks

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strconv"
)

// FormatOptions choose the layout cryptsetup writes. Zero values take
// cryptsetup's defaults (16 MiB header, argon2id, sector size detected).
type FormatOptions struct {
	MetadataSize int64  // --luks2-metadata-size, bytes (16 KiB … 4 MiB)
	KeyslotsSize int64  // --luks2-keyslots-size, bytes
	SectorSize   int    // --sector-size
	PBKDF        string // "pbkdf2", "argon2i" or "argon2id"
	// FastKDF makes the keyslot cheap to open (tests and demos only):
	// pbkdf2 with 1000 iterations, or argon2 with 4 iterations of 32 MiB.
	FastKDF bool
	UUID    string // --uuid, optional
}

// Format makes path a LUKS2 volume whose passphrase is the content of
// keyFile, with cryptsetup luksFormat. It refuses when cryptsetup is missing.
func Format(ctx context.Context, path, keyFile string, opts FormatOptions) error {
	bin, err := exec.LookPath("cryptsetup")
	if err != nil {
		return fmt.Errorf("luks format needs cryptsetup (Debian package cryptsetup-bin): %w", err)
	}
	args := []string{"luksFormat", "--type", "luks2", "--batch-mode", "--key-file", keyFile}
	if opts.MetadataSize > 0 {
		args = append(args, "--luks2-metadata-size", strconv.FormatInt(opts.MetadataSize, 10))
	}
	if opts.KeyslotsSize > 0 {
		args = append(args, "--luks2-keyslots-size", strconv.FormatInt(opts.KeyslotsSize, 10))
	}
	if opts.SectorSize > 0 {
		args = append(args, "--sector-size", strconv.Itoa(opts.SectorSize))
	}
	kdf := opts.PBKDF
	if kdf == "" && opts.FastKDF {
		kdf = "pbkdf2"
	}
	switch kdf {
	case "", "pbkdf2", "argon2i", "argon2id":
	default:
		return fmt.Errorf("pbkdf %q: use pbkdf2, argon2i or argon2id", kdf)
	}
	if kdf != "" {
		args = append(args, "--pbkdf", kdf)
	}
	if opts.FastKDF {
		if kdf == "pbkdf2" {
			args = append(args, "--pbkdf-force-iterations", "1000")
		} else {
			args = append(args, "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768", "--pbkdf-parallel", "1")
		}
	}
	if opts.UUID != "" {
		args = append(args, "--uuid", opts.UUID)
	}
	args = append(args, path)
	cmd := exec.CommandContext(ctx, bin, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("cryptsetup luksFormat %s: %w: %s", path, err, bytes.TrimSpace(out.Bytes()))
	}
	return nil
}
