package main

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/bytesize"
	"github.com/ferry-dev/ferry/internal/operator"
)

// newWorkerCmd lists workers and cordons them.
func newWorkerCmd() *cobra.Command {
	wc := &cobra.Command{Use: "worker", Short: "List workers with their lease and capacity; cordon or uncordon them"}
	var reason string
	var asJSON bool
	cordon := &cobra.Command{
		Use:   "cordon WORKER",
		Short: "Stop new placements on a worker (running migrations go on)",
		Args:  cobra.ExactArgs(1),
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, args []string) error {
			w, err := c.Cordon(cmd.Context(), args[0], true, reason)
			if err != nil {
				return withCode(refusalCode(err), err)
			}
			if asJSON {
				return writeJSONOut(cmd.OutOrStdout(), w)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "worker %s cordoned: %s\n", w.Name, w.CordonReason)
			return nil
		}),
	}
	cordon.Flags().StringVar(&reason, "reason", "", "why (shown in ferry worker list)")
	uncordon := &cobra.Command{
		Use:   "uncordon WORKER",
		Short: "Allow new placements on a worker again (refused while it is being drained)",
		Args:  cobra.ExactArgs(1),
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, args []string) error {
			w, err := c.Cordon(cmd.Context(), args[0], false, "")
			if err != nil {
				return withCode(refusalCode(err), err)
			}
			if asJSON {
				return writeJSONOut(cmd.OutOrStdout(), w)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "worker %s takes placements again\n", w.Name)
			return nil
		}),
	}
	list := &cobra.Command{
		Use:   "list",
		Short: "List workers: lease, cordon, free space, slots, rates",
		Args:  cobra.NoArgs,
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, _ []string) error {
			ws, err := c.ListWorkers(cmd.Context())
			if err != nil {
				return withCode(refusalCode(err), err)
			}
			if asJSON {
				return writeJSONOut(cmd.OutOrStdout(), ws)
			}
			printWorkers(cmd.OutOrStdout(), ws, time.Now())
			return nil
		}),
	}
	for _, sc := range []*cobra.Command{cordon, uncordon, list} {
		sc.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	}
	for _, sc := range []*cobra.Command{cordon, uncordon, list} {
		addClientFlags(sc)
	}
	wc.AddCommand(cordon, uncordon, list)
	return wc
}

func printWorkers(w io.Writer, ws []fsm.Worker, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tLEASE\tPLACEMENT\tFREE\tSLOTS IN/OUT\tHYDRATE\tLINK")
	for _, x := range ws {
		lease := "expired"
		if x.Alive(now) {
			lease = "valid " + operator.Age(x.LeaseExpiry.Sub(now))
		}
		pl := "eligible"
		if x.Cordoned {
			pl = "cordoned (" + x.CordonReason + ")"
		}
		free, hyd, link := "-", "-", "-"
		if r := x.Report; r != nil {
			if r.TotalBytes > 0 {
				free = fmt.Sprintf("%s of %s", bytesize.Format(r.FreeBytes), bytesize.Format(r.TotalBytes))
			}
			if r.HydrateBPS > 0 {
				hyd = bytesize.Format(r.HydrateBPS) + "/s"
			}
			if r.LinkBPS > 0 {
				link = bytesize.Format(r.LinkBPS) + "/s"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d/%d\t%s\t%s\n", x.Name, lease, pl, free, x.LimitIn(), x.LimitOut(), hyd, link)
	}
	tw.Flush()
}

// volumeStoreReport returns what the agent reports with its heartbeats: the
// free and total bytes of the file system holding its volumes, and its
// hydration cap. A failed statfs reports nothing rather than zero free.
func volumeStoreReport(dataDir string, hydrateBPS int64) func() *fsm.WorkerReport {
	return func() *fsm.WorkerReport {
		var st unix.Statfs_t
		if err := unix.Statfs(dataDir, &st); err != nil {
			return nil
		}
		return &fsm.WorkerReport{FreeBytes: int64(st.Bavail) * st.Bsize, TotalBytes: int64(st.Blocks) * st.Bsize, HydrateBPS: hydrateBPS}
	}
}
