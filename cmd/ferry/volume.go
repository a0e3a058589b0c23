package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/fsm"
)

// parseSize reads 512, 64M, 1G, 2T (binary units).
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(strings.ToUpper(strings.TrimSuffix(strings.ToUpper(s), "B")))
	mult := int64(1)
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'K':
			mult, s = 1<<10, s[:n-1]
		case 'M':
			mult, s = 1<<20, s[:n-1]
		case 'G':
			mult, s = 1<<30, s[:n-1]
		case 'T':
			mult, s = 1<<40, s[:n-1]
		}
	}
	v, err := strconv.ParseInt(strings.TrimSuffix(s, "I"), 10, 64)
	if err != nil || v <= 0 {
		return 0, fmt.Errorf("size %q: use a positive number with an optional K, M, G or T suffix", s)
	}
	return v * mult, nil
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func init() {
	vol := &cobra.Command{Use: "volume", Short: "Create, list, show and destroy encrypted volumes"}

	var worker, size string
	var wait bool
	create := &cobra.Command{
		Use:   "create ID --worker W --size SIZE",
		Short: "Create a LUKS2-encrypted volume with ext4 on a worker (its agent formats it)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := parseSize(size)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			if worker == "" {
				return withCode(ExitUsage, fmt.Errorf("--worker is required"))
			}
			c, err := newAPIClient()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx := cmd.Context()
			v, err := c.CreateVolume(ctx, fsm.Volume{ID: args[0], Worker: worker, Size: n, State: fsm.VolCreating})
			if err != nil {
				return withCode(refusalCode(err), err)
			}
			key := make([]byte, 32)
			if _, err := rand.Read(key); err != nil {
				return err
			}
			pass := []byte(hex.EncodeToString(key))
			if err := c.SetVolumeKey(ctx, v.ID, pass); err != nil {
				return withCode(refusalCode(err), fmt.Errorf("store the key of volume %s: %w", v.ID, err))
			}
			clear(pass)
			if wait {
				if v, err = waitVolume(ctx, c, v.ID, fsm.VolCreated, 5*time.Minute); err != nil {
					return err
				}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s on %s: %s, %s\n", v.ID, v.Worker, humanBytes(v.Size), v.State)
			return nil
		},
	}
	create.Flags().StringVar(&worker, "worker", "", "worker that holds the volume")
	create.Flags().StringVar(&size, "size", "1G", "size (K, M, G, T suffixes)")
	create.Flags().BoolVar(&wait, "wait", true, "wait until the worker formatted it")
	addClientFlags(create)

	var asJSON bool
	list := &cobra.Command{
		Use:   "list",
		Short: "List volumes",
		Args:  cobra.NoArgs,
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, _ []string) error {
			vs, err := c.ListVolumes(cmd.Context(), worker)
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSONOut(cmd.OutOrStdout(), vs)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tWORKER\tSIZE\tSTATE\tMACHINE")
			for _, v := range vs {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", v.ID, v.Worker, humanBytes(v.Size), v.State, v.AttachedMachine)
			}
			return tw.Flush()
		}),
	}
	list.Flags().StringVar(&worker, "worker", "", "only volumes of this worker")
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	addClientFlags(list)

	show := &cobra.Command{
		Use:   "show ID",
		Short: "Show one volume (never its key)",
		Args:  cobra.ExactArgs(1),
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, args []string) error {
			v, err := c.GetVolume(cmd.Context(), args[0])
			if err != nil {
				return withCode(refusalCode(err), err)
			}
			return writeJSONOut(cmd.OutOrStdout(), v)
		}),
	}
	addClientFlags(show)

	var retention time.Duration
	destroy := &cobra.Command{
		Use:   "destroy ID",
		Short: "Destroy a volume after a retention window (refused while a machine uses it)",
		Args:  cobra.ExactArgs(1),
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, args []string) error {
			v, err := c.DestroyVolume(cmd.Context(), args[0], retention)
			if err != nil {
				return withCode(refusalCode(err), err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s is %s", v.ID, v.State)
			if !v.DestroyAfter.IsZero() {
				fmt.Fprintf(cmd.OutOrStdout(), " until %s", v.DestroyAfter.Format(time.RFC3339))
			}
			fmt.Fprintln(cmd.OutOrStdout())
			return nil
		}),
	}
	destroy.Flags().DurationVar(&retention, "retention", fsm.DefaultDestroyRetention, "how long the data is kept before it is really deleted")
	addClientFlags(destroy)

	var cfgPath string
	serve := &cobra.Command{
		Use:    "serve --config FILE",
		Short:  "Serve one volume's userspace block stack over FUSE (started by the agent; passphrase on stdin)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(true)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return userspace.ServeConfigFile(ctx, log, cfgPath, os.Stdin)
		},
	}
	serve.Flags().StringVar(&cfgPath, "config", "", "datapath configuration (JSON)")

	vol.AddCommand(create, list, show, destroy, serve)
	register(vol)
}

// refusalCode maps an API refusal to the "refused" exit code.
func refusalCode(err error) int {
	var e *api.Error
	if ok := asAPIError(err, &e); ok && e.Status >= 400 && e.Status < 500 {
		return ExitRefused
	}
	return ExitFailed
}

func waitVolume(ctx context.Context, c *api.Client, id string, want fsm.VolumeState, timeout time.Duration) (*fsm.Volume, error) {
	deadline := time.Now().Add(timeout)
	for {
		v, err := c.GetVolume(ctx, id)
		if err == nil && v.State == want {
			return v, nil
		}
		if time.Now().After(deadline) {
			st := "unknown"
			if v != nil {
				st = string(v.State)
			}
			return nil, fmt.Errorf("volume %s is still %s after %v: is the agent of its worker running? (see its log)", id, st, timeout)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}
