package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/internal/bytesize"
	"github.com/ferry-dev/ferry/internal/demo"
	"github.com/ferry-dev/ferry/internal/logging"
)

func newDemoCmd() *cobra.Command {
	var size string
	var keep bool
	var dir string
	var runFor time.Duration
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Migrate a running machine and its encrypted volume between two local agents, then verify and clean up",
		Long: `Starts a server and two agents, each in its own network namespace joined by a private IPv6
fabric; creates a LUKS2-encrypted volume with ext4 on worker A; runs a machine that appends
checksummed records to it; migrates it to worker B with a progress bar; verifies that every
acknowledged record survived and that the old 6PN address still answers; prints downtime and
bytes fetched vs skipped; and removes everything it made, also on Ctrl-C. Needs root.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			n, err := bytesize.Parse(size)
			if err != nil {
				return withCode(ExitUsage, fmt.Errorf("--size: %w", err))
			}
			if os.Geteuid() != 0 {
				return withCode(ExitUsage, errors.New("the demo creates network namespaces, loop devices and mounts: run it as root"))
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			err = demo.Run(ctx, cmd.OutOrStdout(), demo.Config{Exe: exe, Size: n, Dir: dir, Keep: keep, Warmup: runFor,
				Live: isTerminal(os.Stdout), Log: logging.For(logging.Default(), "demo").Level(zerolog.WarnLevel)})
			if err != nil && ctx.Err() != nil && !keep {
				return withCode(130, errors.New("interrupted; everything the demo made was removed"))
			}
			return err
		},
	}
	cmd.Flags().StringVar(&size, "size", "1G", "volume size")
	cmd.Flags().StringVar(&dir, "dir", "", "work dir (default: a new folder under /tmp)")
	cmd.Flags().BoolVar(&keep, "keep", false, "leave the cluster running until Ctrl-C and print the commands that run `ferry status` and `ferry ui` against it")
	cmd.Flags().DurationVar(&runFor, "warmup", 2*time.Second, "how long the machine writes on worker A before the migration")
	return cmd
}
