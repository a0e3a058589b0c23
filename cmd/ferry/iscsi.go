package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/iscsi"
)

// iscsiStateRoot holds one directory per export started from the CLI.
const iscsiStateRoot = "/run/ferry/iscsi"

func iscsiStateDir(iqn string) string {
	return filepath.Join(iscsiStateRoot, strings.NewReplacer(":", "_", "/", "_").Replace(iqn))
}

func newISCSICmd() *cobra.Command {
	cmd := &cobra.Command{Use: "iscsi", Short: "Export a volume over iSCSI (source side) or read one (target side)"}
	cmd.AddCommand(iscsiExportCmd(), iscsiStopCmd(), iscsiReadCmd(), iscsiServeCmd())
	return cmd
}

func iscsiExportCmd() *cobra.Command {
	var (
		listen, iqn, stateDir string
		allow                 []string
		lun                   uint64
		blockSize             int
	)
	c := &cobra.Command{
		Use:   "export FILE_OR_DEVICE --listen ADDR --allow ADDR",
		Short: "Export a file or device read-only over iSCSI until interrupted",
		Long: `Exports FILE_OR_DEVICE read-only as one LUN. The target (gotgt) runs in a
child process inside a private network namespace; the only way in is the gate on
--listen, which admits the --allow addresses alone. Prints the portal and IQN.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			log, err := newLogger(false)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			if listen == "" || len(allow) == 0 {
				return withCode(ExitUsage, errors.New("--listen and --allow are required: the gate admits only the given addresses"))
			}
			if iqn == "" {
				b := make([]byte, 4)
				_, _ = rand.Read(b)
				iqn = iscsi.MigrationIQN("dev.ferry", "manual-"+hex.EncodeToString(b), time.Now())
			}
			if stateDir == "" {
				stateDir = iscsiStateDir(iqn)
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			e, err := iscsi.StartExport(ctx, log, iscsi.ExportConfig{
				Path: args[0], Listen: listen, Allow: allow, IQN: iqn, LUN: lun, BlockSize: blockSize,
				StateDir: stateDir, LogLevel: flagLogLevel,
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "portal: %s\niqn: %s\nlun: %d\n", e.Portal(), e.IQN(), lun)
			select {
			case <-ctx.Done():
				return e.Stop()
			case <-e.Done():
				return e.Err()
			}
		},
	}
	f := c.Flags()
	f.StringVar(&listen, "listen", "", "gate address host:port (port 0 picks one); a concrete address, since discovery announces it")
	f.StringSliceVar(&allow, "allow", nil, "address or CIDR allowed to connect (repeatable)")
	f.StringVar(&iqn, "iqn", "", "target IQN (default: a fresh iqn.YYYY-MM.dev.ferry:ferry:manual-...)")
	f.Uint64Var(&lun, "lun", 0, "LUN number")
	f.IntVar(&blockSize, "block-size", 512, "logical block size")
	f.StringVar(&stateDir, "state-dir", "", "state directory (default "+iscsiStateRoot+"/<iqn>)")
	return c
}

func iscsiStopCmd() *cobra.Command {
	var iqn, stateDir string
	c := &cobra.Command{
		Use:   "stop [--iqn IQN | --state-dir DIR]",
		Short: "Stop exports started by `ferry iscsi export` or the agent (all under " + iscsiStateRoot + " by default)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var dirs []string
			switch {
			case stateDir != "":
				dirs = []string{stateDir}
			case iqn != "":
				dirs = []string{iscsiStateDir(iqn)}
			default:
				entries, err := os.ReadDir(iscsiStateRoot)
				if err != nil && !errors.Is(err, os.ErrNotExist) {
					return err
				}
				for _, e := range entries {
					dirs = append(dirs, filepath.Join(iscsiStateRoot, e.Name()))
				}
			}
			var errs []error
			for _, d := range dirs {
				stopped, err := iscsi.StopRecorded(d)
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", d, err))
				} else if stopped {
					fmt.Fprintln(cmd.OutOrStdout(), "stopped", d)
				}
			}
			return errors.Join(errs...)
		},
	}
	c.Flags().StringVar(&iqn, "iqn", "", "stop the export of this IQN")
	c.Flags().StringVar(&stateDir, "state-dir", "", "stop the export recorded in this directory")
	return c
}

func iscsiReadCmd() *cobra.Command {
	var (
		out        string
		lun        uint64
		qd, reqKiB int
		timeout    time.Duration
	)
	c := &cobra.Command{
		Use:   "read PORTAL IQN --out FILE",
		Short: "Copy a LUN to a file with ferry's initiator (debugging, benchmark baseline)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			log, err := newLogger(false)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			if out == "" {
				return withCode(ExitUsage, errors.New("--out is required"))
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			l, err := iscsi.Dial(ctx, log, iscsi.InitiatorConfig{
				Portal: args[0], IQN: args[1], LUN: lun, Timeout: timeout, QueueDepth: qd, MaxTransfer: reqKiB << 10,
			})
			if err != nil {
				return err
			}
			defer l.Close()
			f, err := os.OpenFile(out, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
			if err != nil {
				return err
			}
			start := time.Now()
			n, err := l.CopyTo(ctx, f)
			if err != nil {
				f.Close()
				return err
			}
			if err := f.Close(); err != nil {
				return err
			}
			secs := time.Since(start).Seconds()
			fmt.Fprintf(cmd.OutOrStdout(), "copied %d bytes in %.2f s (%.1f MiB/s, queue depth %d, request %d KiB)\n",
				n, secs, float64(n)/secs/(1<<20), qd, reqKiB)
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&out, "out", "", "output file")
	f.Uint64Var(&lun, "lun", 0, "LUN number")
	f.IntVar(&qd, "queue-depth", 16, "commands in flight")
	f.IntVar(&reqKiB, "request-kib", 1024, "bytes per READ(16), in KiB")
	f.DurationVar(&timeout, "timeout", 10*time.Second, "per-command timeout, reconnects included")
	return c
}

// iscsiServeCmd is the export child the agent (or `iscsi export`) starts.
func iscsiServeCmd() *cobra.Command {
	var stateDir string
	c := &cobra.Command{
		Use:    "serve --state-dir DIR",
		Short:  "Run one export inside its private network namespace (started by ferry itself)",
		Hidden: true,
		Args:   cobra.NoArgs,
		Run: func(cmd *cobra.Command, args []string) {
			if !iscsi.IsExportChild() {
				fmt.Fprintln(os.Stderr, "ferry iscsi serve is started by `ferry iscsi export` or the agent, not by hand")
				os.Exit(ExitUsage)
			}
			iscsi.ServeChild()
		},
	}
	c.Flags().StringVar(&stateDir, "state-dir", "", "the export's state directory (identifies the process)")
	return c
}
