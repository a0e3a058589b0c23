package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/machine/workload"
)

// `ferry workload run` is the demo and test machine: it appends checksummed
// records to its volume and acknowledges durable batches outside it, and
// answers TCP on its 6PN address so address rewriting can be checked.
func newWorkloadCmd() *cobra.Command {
	var cfg workload.Config
	var listen string
	run := &cobra.Command{
		Use:   "run",
		Short: "Append checksummed records to the volume until interrupted",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfg.Dir == "" {
				cfg.Dir = os.Getenv("FERRY_VOLUME_DIR")
			}
			if cfg.Writer == "" {
				cfg.Writer = os.Getenv("FERRY_WORKER")
			}
			if cfg.Dir == "" || cfg.AckFile == "" {
				return withCode(ExitUsage, fmt.Errorf("--dir (or FERRY_VOLUME_DIR) and --ack are required"))
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if listen != "" {
				ln, err := net.Listen("tcp", listen)
				if err != nil {
					return fmt.Errorf("workload listen %s: %w", listen, err)
				}
				defer ln.Close()
				go workload.ServeEchoWho(ln, os.Getenv("FERRY_WORKER"))
			}
			return workload.Run(ctx, cfg)
		},
	}
	run.Flags().StringVar(&cfg.Dir, "dir", "", "the volume's mount point (default $FERRY_VOLUME_DIR)")
	run.Flags().StringVar(&cfg.AckFile, "ack", "", "file outside the volume where durable batches are acknowledged")
	run.Flags().StringVar(&cfg.Writer, "writer", "", "name written into each record (default $FERRY_WORKER)")
	run.Flags().DurationVar(&cfg.Interval, "interval", 5*time.Millisecond, "time between batches")
	run.Flags().IntVar(&cfg.Batch, "batch", 8, "records per batch")
	run.Flags().StringVar(&listen, "listen", "", "also answer TCP echo on this address (e.g. [::]:7000)")

	verify := &cobra.Command{
		Use:   "verify DIR ACKFILE",
		Short: "Check that every acknowledged record is present in DIR",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			present, acked, err := workload.Verify(args[0], args[1])
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%d records present, %d acknowledged: none lost\n", present, acked)
			return nil
		},
	}
	wl := &cobra.Command{Use: "workload", Short: "The checksummed-records workload used by the demo and tests", Hidden: true}
	wl.AddCommand(run, verify)
	return wl
}
