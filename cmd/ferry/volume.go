package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/bytesize"
	"github.com/ferry-dev/ferry/internal/operator"
)

func newVolumeCmd() *cobra.Command {
	vol := &cobra.Command{Use: "volume", Short: "Create, list, show and destroy encrypted volumes"}
	vol.AddCommand(newVolumeCreateCmd(), newVolumeListCmd(), newVolumeShowCmd(), newVolumeExtendCmd(), newVolumeForkCmd(), newVolumeDestroyCmd(), newVolumeRecoverCmd(), newVolumeServeCmd())
	return vol
}

func newVolumeCreateCmd() *cobra.Command {
	var worker, size string
	var wait, createJSON bool
	create := &cobra.Command{
		Use:   "create ID --worker W --size SIZE",
		Short: "Create a LUKS2-encrypted volume with ext4 on a worker (its agent formats it)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := bytesize.Parse(size)
			if err != nil {
				return withCode(ExitUsage, fmt.Errorf("--size: %w", err))
			}
			if worker == "" {
				return withCode(ExitUsage, fmt.Errorf("--worker is required"))
			}
			c, err := newAPIClient()
			if err != nil {
				return err
			}
			defer c.Close()
			var timeout time.Duration
			if wait {
				timeout = 5 * time.Minute
			}
			v, err := operator.CreateVolume(cmd.Context(), c, args[0], worker, n, timeout)
			if err != nil {
				return withCode(exitCode(err), err)
			}
			if createJSON {
				return writeJSONOut(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s on %s: %s, %s\n", v.ID, v.Worker, bytesize.Format(v.Size), v.State)
			return nil
		},
	}
	create.Flags().StringVar(&worker, "worker", "", "worker that holds the volume")
	create.Flags().StringVar(&size, "size", "1G", "size: 4096, 512MiB, 100GiB, 1G (bare K, M, G, T are binary)")
	create.Flags().BoolVar(&wait, "wait", true, "wait until the worker formatted it")
	create.Flags().BoolVar(&createJSON, "json", false, "print the volume record as JSON")
	addClientFlags(create)
	return create
}

func newVolumeListCmd() *cobra.Command {
	var worker string
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
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", v.ID, v.Worker, bytesize.Format(v.Size), v.State, v.AttachedMachine)
			}
			return tw.Flush()
		}),
	}
	list.Flags().StringVar(&worker, "worker", "", "only volumes of this worker")
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	addClientFlags(list)
	return list
}

func newVolumeShowCmd() *cobra.Command {
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
	return show
}

func newVolumeExtendCmd() *cobra.Command {
	var size string
	var wait time.Duration
	var asJSON bool
	extend := &cobra.Command{
		Use:   "extend ID --size SIZE",
		Short: "Grow a volume and its filesystem online, under its running machine (shrinking and volumes in migration are refused)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := bytesize.Parse(size)
			if err != nil || size == "" {
				return withCode(ExitUsage, fmt.Errorf("--size: %w", errors.Join(err, errors.New("give the new size, e.g. 20GiB"))))
			}
			c, err := newAPIClient()
			if err != nil {
				return err
			}
			defer c.Close()
			v, err := operator.ExtendVolume(cmd.Context(), c, args[0], n, wait)
			if err != nil {
				return withCode(exitCode(err), err)
			}
			if asJSON {
				return writeJSONOut(cmd.OutOrStdout(), v)
			}
			if v.Extending() {
				fmt.Fprintf(cmd.OutOrStdout(), "volume %s on %s: %s, growing to %s\n", v.ID, v.Worker, bytesize.Format(v.Size), bytesize.Format(v.WantSize))
			} else {
				fmt.Fprintf(cmd.OutOrStdout(), "volume %s on %s: %s\n", v.ID, v.Worker, bytesize.Format(v.Size))
			}
			return nil
		},
	}
	extend.Flags().StringVar(&size, "size", "", "new size of the whole volume: 4096, 512MiB, 100GiB, 1G (bare K, M, G, T are binary)")
	extend.Flags().DurationVar(&wait, "wait", 5*time.Minute, "wait this long for the worker to grow it (0: return once recorded)")
	extend.Flags().BoolVar(&asJSON, "json", false, "print the volume record as JSON")
	addClientFlags(extend)
	return extend
}

func newVolumeForkCmd() *cobra.Command {
	var to, newID string
	var wait time.Duration
	var asJSON bool
	fork := &cobra.Command{
		Use:   "fork ID [--to WORKER] [--id NEW]",
		Short: "Copy a volume as it is now, while its machine keeps running, under a key of the copy's own",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newAPIClient()
			if err != nil {
				return err
			}
			defer c.Close()
			v, err := operator.ForkVolume(cmd.Context(), c, args[0], newID, to, wait)
			if err != nil {
				return withCode(exitCode(err), err)
			}
			if asJSON {
				return writeJSONOut(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s on %s: fork of %s, %s, %s\n", v.ID, v.Worker, v.ForkOf, bytesize.Format(v.Size), v.State)
			return nil
		},
	}
	fork.Flags().StringVar(&to, "to", "", "worker for the copy (default: the source's worker); another worker clones the copy and hydrates it in the background")
	fork.Flags().StringVar(&newID, "id", "", "id of the copy (default ID-fork-XXXX)")
	fork.Flags().DurationVar(&wait, "wait", 10*time.Minute, "wait this long for the copy to be made (0: return once registered)")
	fork.Flags().BoolVar(&asJSON, "json", false, "print the volume record as JSON")
	addClientFlags(fork)
	return fork
}

func newVolumeDestroyCmd() *cobra.Command {
	var retention time.Duration
	var destroyJSON bool
	destroy := &cobra.Command{
		Use:   "destroy ID",
		Short: "Destroy a volume after a retention window (refused while a machine uses it)",
		Args:  cobra.ExactArgs(1),
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, args []string) error {
			v, err := c.DestroyVolume(cmd.Context(), args[0], retention)
			if err != nil {
				return withCode(refusalCode(err), err)
			}
			if destroyJSON {
				return writeJSONOut(cmd.OutOrStdout(), v)
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
	destroy.Flags().BoolVar(&destroyJSON, "json", false, "print the volume record as JSON")
	addClientFlags(destroy)
	return destroy
}

func newVolumeServeCmd() *cobra.Command {
	var (
		cfgPath     string
		awaitConfig bool
		statusFD    int
	)
	serve := &cobra.Command{
		Use:    "serve --config FILE [--await-config [--status-fd N]]",
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
			if awaitConfig {
				return userspace.ServeAwaitingConfig(ctx, log, cfgPath, os.Stdin, userspace.StatusFile(statusFD), userspace.PrestartPatience)
			}
			return userspace.ServeConfigFile(ctx, log, cfgPath, os.Stdin)
		},
	}
	serve.Flags().StringVar(&cfgPath, "config", "", "datapath configuration (JSON)")
	serve.Flags().IntVar(&statusFD, "status-fd", -1, "with --await-config: the inherited descriptor (3 or more) to report the early login's end on")
	serve.Flags().BoolVar(&awaitConfig, "await-config", false, "start now, read FILE only once a line arrives on stdin (the agent prestarts a clone's datapath before its configuration exists)")
	return serve
}
