package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/internal/bytesize"
	"github.com/ferry-dev/ferry/internal/passphrase"
	"github.com/ferry-dev/ferry/luks"
)

func newLUKSCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "luks",
		Short: "LUKS2 volumes: dump a header's layout, format a test volume, check a carried layout",
	}
	cmd.AddCommand(luksDumpCmd(), luksFormatCmd(), luksCheckCmd())
	return cmd
}

func luksDumpCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "dump DEVICE",
		Short: "Print the layout ferry carries and the header fields cryptsetup luksDump shows",
		Long: "Reads both LUKS2 header copies of DEVICE (a file or block device) without writing,\n" +
			"and prints the carried layout, which copy is in use and what is wrong with the other,\n" +
			"then the header in cryptsetup luksDump's format. No key is needed or shown.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := blockdev.OpenFile(args[0], true)
			if err != nil {
				return withCode(ExitFailed, err)
			}
			defer f.Close()
			d, err := luks.NewDump(f, f.Size())
			if err != nil {
				return withCode(ExitFailed, fmt.Errorf("%s: %w", args[0], err))
			}
			out := cmd.OutOrStdout()
			if asJSON {
				js, err := json.MarshalIndent(d, "", "  ")
				if err != nil {
					return withCode(ExitFailed, err)
				}
				_, err = out.Write(append(luks.EscapeJSONControls(js), '\n'))
				return err
			}
			fmt.Fprint(out, d.Text(args[0]))
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON: layout, header copy used, damaged copies, parsed header")
	return cmd
}

func luksFormatCmd() *cobra.Command {
	var (
		keyFile, size, pbkdf string
		opts                 luks.FormatOptions
		generate             bool
	)
	cmd := &cobra.Command{
		Use:   "format FILE --key-file K",
		Short: "Make FILE a LUKS2 volume with cryptsetup (tests and demos)",
		Long: "Runs cryptsetup luksFormat --type luks2 on FILE with the passphrase in K.\n" +
			"--size creates or grows FILE as a sparse file first. --generate-key writes a new\n" +
			"random passphrase to K (mode 0600) when K does not exist. --fast-kdf makes the\n" +
			"keyslot cheap to open: for tests only.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			path := args[0]
			if keyFile == "" {
				return withCode(ExitUsage, errors.New("--key-file is required"))
			}
			opts.PBKDF = pbkdf
			if size != "" {
				n, err := bytesize.Parse(size)
				if err != nil {
					return withCode(ExitUsage, fmt.Errorf("--size: %w", err))
				}
				f, err := blockdev.CreateSparse(path, n)
				if err != nil {
					return withCode(ExitFailed, err)
				}
				f.Close()
			}
			if _, err := os.Stat(keyFile); errors.Is(err, os.ErrNotExist) && generate {
				pass := passphrase.New()
				err := os.WriteFile(keyFile, pass, 0o600)
				clear(pass)
				if err != nil {
					return withCode(ExitFailed, fmt.Errorf("write new key file: %w", err))
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "wrote a new passphrase to %s\n", keyFile)
			}
			if err := luks.Format(cmd.Context(), path, keyFile, opts); err != nil {
				return withCode(ExitFailed, err)
			}
			f, err := blockdev.OpenFile(path, true)
			if err != nil {
				return withCode(ExitFailed, err)
			}
			defer f.Close()
			h, err := luks.ReadHeader(f, f.Size())
			if err != nil {
				return withCode(ExitFailed, err)
			}
			l, err := h.Layout(f.Size())
			if err != nil {
				return withCode(ExitFailed, err)
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			return enc.Encode(l)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&keyFile, "key-file", "", "file whose exact content is the passphrase")
	fl.BoolVar(&generate, "generate-key", false, "create --key-file with a random passphrase if it does not exist")
	fl.StringVar(&size, "size", "", "create or grow FILE to this size first (bytes, or with K/M/G/T suffix, powers of 1024)")
	fl.Int64Var(&opts.MetadataSize, "metadata-size", 0, "LUKS2 metadata size per header copy, bytes (default cryptsetup's 16384)")
	fl.Int64Var(&opts.KeyslotsSize, "keyslots-size", 0, "LUKS2 keyslots area size, bytes (default cryptsetup's, giving a 16 MiB header)")
	fl.IntVar(&opts.SectorSize, "sector-size", 0, "encryption sector size: 512, 1024, 2048 or 4096 (default: cryptsetup decides)")
	fl.StringVar(&pbkdf, "pbkdf", "", "keyslot KDF: pbkdf2, argon2i or argon2id (default cryptsetup's argon2id)")
	fl.BoolVar(&opts.FastKDF, "fast-kdf", false, "cheap keyslot KDF for tests: pbkdf2 1000 iterations or argon2 4×32 MiB")
	fl.StringVar(&opts.UUID, "uuid", "", "volume UUID (default: random)")
	return cmd
}

func luksCheckCmd() *cobra.Command {
	var layoutArg string
	cmd := &cobra.Command{
		Use:   "check --layout JSON DEVICE",
		Short: "Say whether this worker can open a carried layout on DEVICE, and the plaintext size",
		Long: "--layout is the layout JSON itself, or @FILE to read it from a file.\n" +
			"Prints the plaintext size in bytes; exits 1 with the reason when the layout\n" +
			"cannot be opened here (unsupported cipher, device size mismatch).",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			raw := []byte(layoutArg)
			if strings.HasPrefix(layoutArg, "@") {
				b, err := os.ReadFile(layoutArg[1:])
				if err != nil {
					return withCode(ExitUsage, fmt.Errorf("--layout: %w", err))
				}
				raw = b
			}
			var l luks.Layout
			dec := json.NewDecoder(strings.NewReader(string(raw)))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&l); err != nil {
				return withCode(ExitUsage, fmt.Errorf("--layout is not a layout JSON object: %w", err))
			}
			f, err := blockdev.OpenFile(args[0], true)
			if err != nil {
				return withCode(ExitFailed, err)
			}
			defer f.Close()
			n, err := luks.CheckCompatible(l, f.Size())
			if err != nil {
				return withCode(ExitFailed, fmt.Errorf("cannot open layout on %s: %w", args[0], err))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%d\n", n)
			return nil
		},
	}
	cmd.Flags().StringVar(&layoutArg, "layout", "", "layout JSON, or @FILE")
	cmd.MarkFlagRequired("layout")
	return cmd
}
