package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/bytesize"
	"github.com/ferry-dev/ferry/internal/operator"
)

// newDrainCmd records a drain the servers run: the command returns once
// the drain is replicated, and the leader moves the machines whether or not
// this process lives. --wait only follows it.
func newDrainCmd() *cobra.Command {
	var targets, bandwidth string
	var parallel int
	var deadline time.Duration
	var planOnly, wait, cancel, yes, asJSON bool
	cmd := &cobra.Command{
		Use:   "drain WORKER",
		Short: "Cordon a worker and have the servers move every machine off it, within limits and an optional deadline",
		Long: `Cordon a worker and record a drain: the leader server starts migrations off it, at most --parallel
at a time, onto workers with room for each volume plus a margin (least loaded first; --to restricts
the targets), within the source's bandwidth budget. The drain goes on across leader changes with no
CLI running. At --deadline what is left is recorded in the drain (ferry status), never killed.
--plan prints each placement and its reason (or the constraint that refuses it) and changes nothing.
--cancel stops starting migrations (running ones go on; the worker stays cordoned).
Exit codes: 0 recorded (or, with --wait, complete), 1 deadline passed with machines left, 2 usage,
3 refused (or, with --plan, some machine has no target).`,
		Args: cobra.ExactArgs(1),
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, args []string) error {
			ctx, out := cmd.Context(), cmd.OutOrStdout()
			worker := args[0]
			if cancel {
				d, err := c.CancelDrain(ctx, worker)
				if err != nil {
					return withCode(refusalCode(err), err)
				}
				if asJSON {
					return writeJSONOut(out, d)
				}
				fmt.Fprintf(out, "drain %s of %s cancelled; %s stays cordoned (ferry worker uncordon %s)\n", d.ID, worker, worker, worker)
				printLeft(out, d)
				return nil
			}
			if parallel < 0 || parallel > fsm.MaxDrainParallel {
				return withCode(ExitUsage, fmt.Errorf("--parallel must be 1..%d", fsm.MaxDrainParallel))
			}
			req := api.DrainRequest{Worker: worker, Deadline: api.Duration(deadline), Parallel: parallel}
			if targets != "" {
				req.Targets = strings.Split(targets, ",")
			}
			if bandwidth != "" {
				bps, err := bytesize.Parse(strings.TrimSuffix(bandwidth, "/s"))
				if err != nil {
					return withCode(ExitUsage, fmt.Errorf("--bandwidth: %w", err))
				}
				req.BandwidthBPS = bps
			}
			if planOnly || !yes {
				p, err := c.PlanDrain(ctx, req)
				if err != nil {
					return withCode(refusalCode(err), err)
				}
				if asJSON && planOnly {
					return writeJSONOut(out, p)
				}
				printDrainPlan(out, p, req)
				if planOnly {
					if len(p.Unplaced) > 0 {
						return withCode(ExitRefused, fmt.Errorf("%d machines have no target: %s", len(p.Unplaced), p.Unplaced[0].Reason))
					}
					return nil
				}
			}
			if err := confirm(cmd, yes, "drain?"); err != nil {
				return err
			}
			d, err := c.Drain(ctx, req)
			if err != nil {
				return withCode(refusalCode(err), err)
			}
			if !wait {
				if asJSON {
					return writeJSONOut(out, d)
				}
				fmt.Fprintf(out, "drain %s of %s recorded; %s is cordoned. The servers run it: ferry status, or ferry drain %s --wait\n", d.ID, worker, worker, worker)
				return nil
			}
			return followDrain(ctx, c, cmd.ErrOrStderr(), out, d, asJSON)
		}),
	}
	f := cmd.Flags()
	f.StringVar(&targets, "to", "", "allowed target workers, comma-separated (default: any worker placement allows)")
	f.IntVar(&parallel, "parallel", 0, fmt.Sprintf("migrations off the worker at once (default %d)", fsm.DefaultDrainParallel))
	f.DurationVar(&deadline, "deadline", time.Hour, "stop starting migrations after this long and report what is left (0: none)")
	f.StringVar(&bandwidth, "bandwidth", "", "budget of the worker's link for hydrations, e.g. 1GiB/s (default: what the agent reports, or none)")
	f.BoolVar(&planOnly, "plan", false, "print each placement with its reason and change nothing")
	f.BoolVar(&wait, "wait", false, "follow the drain with a progress bar until it ends (the drain does not need this process)")
	f.BoolVar(&cancel, "cancel", false, "cancel the worker's running drain")
	f.BoolVarP(&yes, "yes", "y", false, "drain without asking")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	addClientFlags(cmd)
	return cmd
}

func printDrainPlan(w io.Writer, p *api.DrainPlan, req api.DrainRequest) {
	fmt.Fprintf(w, "drain %s: %d machines placed, %d without a target (planned in %s)\n", p.Worker, len(p.Placements), len(p.Unplaced),
		time.Duration(p.Elapsed).Round(time.Microsecond))
	for _, pl := range p.Placements {
		fmt.Fprintf(w, "  %-20s %10s -> %-16s %s\n", pl.Machine, bytesize.Format(pl.Bytes), pl.Target, pl.Reason)
	}
	for _, u := range p.Unplaced {
		fmt.Fprintf(w, "  %-20s %10s -> %-16s %s\n", u.Machine, bytesize.Format(u.Bytes), "(none)", u.Reason)
	}
	par := req.Parallel
	if par == 0 {
		par = fsm.DefaultDrainParallel
	}
	fmt.Fprintf(w, "  the servers start at most %d at a time, within each target's inbound slots and the bandwidth budget\n", par)
}

func printLeft(w io.Writer, d *fsm.Drain) {
	for _, l := range d.Left {
		mig := ""
		if l.Migration != "" {
			mig = " (" + l.Migration + ")"
		}
		fmt.Fprintf(w, "  left %s%s: %s\n", l.Machine, mig, l.Reason)
	}
}

// followDrain shows a drain's progress until it ends: machines moved off
// the worker out of those it held when the drain began.
func followDrain(ctx context.Context, c *api.Client, errw, out io.Writer, d *fsm.Drain, asJSON bool) error {
	ms, err := c.ListMachines(ctx, d.Worker)
	if err != nil {
		return err
	}
	total := len(ms)
	live := !asJSON && isTerminal(os.Stderr)
	bar := progressbar.NewOptions(total, progressbar.OptionSetWriter(errw), progressbar.OptionSetDescription("drain "+d.Worker),
		progressbar.OptionShowCount(), progressbar.OptionSetElapsedTime(true), progressbar.OptionSetPredictTime(true),
		progressbar.OptionSetVisibility(live), progressbar.OptionThrottle(200*time.Millisecond))
	var idx uint64
	lastLine := ""
	for {
		ds, next, err := c.WatchDrains(ctx, d.Worker, idx, 10*time.Second)
		if err != nil {
			return err
		}
		idx = next
		var cur *fsm.Drain
		for _, x := range ds {
			if x.ID == d.ID {
				cur = x
			}
		}
		if cur == nil {
			return fmt.Errorf("drain %s disappeared (collected?)", d.ID)
		}
		left, err := c.ListMachines(ctx, d.Worker)
		if err != nil {
			return err
		}
		_ = bar.Set(total - len(left))
		if !live {
			line := fmt.Sprintf("drain %s: %d/%d moved, %d started, %d waiting", cur.State, total-len(left), total, len(cur.Started), len(cur.Waiting))
			if line != lastLine && !asJSON {
				fmt.Fprintln(errw, line)
				lastLine = line
			}
		}
		if cur.State.Terminal() {
			_ = bar.Finish()
			if live {
				fmt.Fprintln(errw)
			}
			if asJSON {
				if err := writeJSONOut(out, cur); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(out, "drain %s of %s %s after %s\n", cur.ID, cur.Worker, cur.State, cur.FinishedAt.Sub(cur.CreatedAt).Round(time.Second))
				printLeft(out, cur)
			}
			switch cur.State {
			case fsm.DrainComplete:
				return nil
			case fsm.DrainDeadline:
				return withCode(ExitFailed, fmt.Errorf("deadline passed with %d machines left on %s", len(cur.Left), cur.Worker))
			default:
				return withCode(ExitRefused, fmt.Errorf("drain %s was %s", cur.ID, cur.State))
			}
		}
	}
}

// printDrains lists drains for ferry status.
func printDrains(w io.Writer, ds []*fsm.Drain, now time.Time) {
	if len(ds) == 0 {
		return
	}
	sort.SliceStable(ds, func(i, j int) bool { return ds[i].State == fsm.DrainRunning && ds[j].State != fsm.DrainRunning })
	fmt.Fprintln(w, "\nDRAINS")
	for _, d := range ds {
		dl := "no deadline"
		if !d.Deadline.IsZero() {
			if d.State == fsm.DrainRunning {
				dl = "deadline in " + operator.Age(d.Deadline.Sub(now))
			} else {
				dl = "deadline " + d.Deadline.UTC().Format(time.RFC3339)
			}
		}
		fmt.Fprintf(w, "%s  %s  %s  started %d, waiting %d, left %d, %s, age %s\n", d.ID, d.Worker, d.State, len(d.Started), len(d.Waiting), len(d.Left), dl, operator.Age(now.Sub(d.CreatedAt)))
		shown := 0
		var ws []string
		for m := range d.Waiting {
			ws = append(ws, m)
		}
		sort.Strings(ws)
		for _, m := range ws {
			if shown == 5 {
				fmt.Fprintf(w, "  ... %d more waiting\n", len(ws)-shown)
				break
			}
			fmt.Fprintf(w, "  waiting %s: %s\n", m, d.Waiting[m])
			shown++
		}
		printLeft(w, d)
	}
}
