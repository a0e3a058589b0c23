package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// confirm asks on a terminal; elsewhere it requires --yes, so automation
// never blocks on a prompt it cannot see.
func confirm(cmd *cobra.Command, yes bool, question string) error {
	if yes {
		return nil
	}
	if !isTerminal(os.Stdin) {
		return withCode(ExitUsage, fmt.Errorf("not a terminal: add --yes to apply without asking"))
	}
	fmt.Fprintf(cmd.OutOrStdout(), "%s [y/N] ", question)
	line, _ := bufio.NewReader(os.Stdin).ReadString('\n')
	if a := strings.ToLower(strings.TrimSpace(line)); a != "y" && a != "yes" {
		return withCode(ExitRefused, errors.New("not applied"))
	}
	return nil
}

// plan describes what a migration would do, from the registries.
type migrationPlan struct {
	Machine, Volume, Source, Target string
	VolumeSize                      int64
	DataOffset                      int64
	Old6PN                          string
	Locks                           []string
	Steps                           []string
}

func makePlan(ctx context.Context, c *api.Client, machineID, target string) (*migrationPlan, error) {
	m, err := c.GetMachine(ctx, machineID)
	if err != nil {
		return nil, withCode(refusalCode(err), err)
	}
	if m.Worker == target {
		return nil, withCode(ExitRefused, fmt.Errorf("machine %s already runs on %s", machineID, target))
	}
	v, err := c.GetVolume(ctx, m.Volume)
	if err != nil {
		return nil, withCode(refusalCode(err), err)
	}
	p := &migrationPlan{Machine: m.ID, Volume: v.ID, Source: m.Worker, Target: target, VolumeSize: v.Size, Old6PN: m.Addr6PN,
		Locks: []string{"volume/" + v.ID}}
	if m.Network != 0 {
		p.Locks = append(p.Locks, fmt.Sprintf("network/%d", m.Network))
	}
	if v.Layout != nil {
		p.DataOffset = v.Layout.DataOffset
	}
	for _, t := range fsm.Transitions {
		if t.From[0] == fsm.RollingBack || t.Event == fsm.EvAbort || t.Event == fsm.EvFailed {
			continue
		}
		p.Steps = append(p.Steps, fmt.Sprintf("%-16s %-8s %s", t.To, t.Roles[0], t.Doc))
	}
	return p, nil
}

func (p *migrationPlan) print(w io.Writer) {
	fmt.Fprintf(w, "migrate machine %s (volume %s, %s) from %s to %s\n", p.Machine, p.Volume, humanBytes(p.VolumeSize), p.Source, p.Target)
	fmt.Fprintf(w, "  LUKS2 layout carried from the source: data offset %s\n", humanBytes(p.DataOffset))
	fmt.Fprintf(w, "  bytes to copy: at most %s; the source's holes (known-zero) and what fstrim frees are skipped\n", humanBytes(p.VolumeSize))
	fmt.Fprintf(w, "  6PN: %s moves to the target's host id; the old address keeps answering for the grace period\n", p.Old6PN)
	fmt.Fprintf(w, "  locks: %s\n  steps:\n", strings.Join(p.Locks, ", "))
	for _, s := range p.Steps {
		fmt.Fprintf(w, "    %s\n", s)
	}
	fmt.Fprintln(w, "  abort is safe until cutover (the machine restarts on the source); after cutover only forward")
}

// progressLine renders one migration's progress.
func progressLine(m *fsm.Migration) string {
	const width = 30
	pct := 0.0
	rate, eta := "", ""
	if m.Progress != nil {
		pct = m.Progress.Percent()
		if m.Progress.RateBPS > 0 {
			rate = humanBytes(m.Progress.RateBPS) + "/s"
		}
		if m.Progress.ETASeconds > 0 {
			eta = "ETA " + (time.Duration(m.Progress.ETASeconds) * time.Second).String()
		}
	}
	if m.State == fsm.Hydrated || m.State == fsm.SourceReleased || m.State == fsm.Completed {
		pct = 100
	}
	n := int(pct / 100 * width)
	bar := strings.Repeat("#", n) + strings.Repeat(".", width-n)
	s := fmt.Sprintf("%-14s %-16s [%s] %5.1f%% %s %s", m.ID, m.State, bar, pct, rate, eta)
	if m.Stalled {
		s += " STALLED: " + m.StallCause
	}
	return strings.TrimRight(s, " ")
}

// waitMigrations follows migrations until each ends; it returns the final records.
func waitMigrations(ctx context.Context, c *api.Client, w io.Writer, ids []string, live bool) (map[string]*fsm.Migration, error) {
	final := map[string]*fsm.Migration{}
	last := map[string]string{}
	for len(final) < len(ids) {
		for _, id := range ids {
			if final[id] != nil {
				continue
			}
			m, err := c.GetMigration(ctx, id)
			if err != nil {
				return final, err
			}
			line := progressLine(m)
			if line != last[id] {
				if live {
					fmt.Fprintf(w, "\r\033[K%s", line)
				} else {
					fmt.Fprintln(w, line)
				}
				last[id] = line
			}
			if m.State.Terminal() {
				if live {
					fmt.Fprintln(w)
				}
				final[id] = m
			}
		}
		select {
		case <-ctx.Done():
			return final, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return final, nil
}

func outcomeCode(ms map[string]*fsm.Migration) error {
	var rolled []string
	for id, m := range ms {
		if m.State == fsm.RolledBack {
			reason := ""
			if m.Rollback != nil {
				reason = ": " + m.Rollback.Reason
			}
			rolled = append(rolled, id+reason)
		}
	}
	if len(rolled) > 0 {
		sort.Strings(rolled)
		return withCode(ExitRolledBack, fmt.Errorf("rolled back: %s", strings.Join(rolled, "; ")))
	}
	return nil
}

func init() {
	var target string
	var planOnly, wait, yes, asJSON bool
	mig := &cobra.Command{
		Use:   "migrate MACHINE --to WORKER",
		Short: "Move a machine and its volume to another worker (kill, clone, boot)",
		Long: `Move a machine and its volume to another worker. --plan prints what would happen and changes
nothing. Exit codes: 0 completed (or started, without --wait), 1 failed, 2 usage, 3 refused, 4 rolled back.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if target == "" {
				return withCode(ExitUsage, fmt.Errorf("--to is required"))
			}
			c, err := newAPIClient()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx := cmd.Context()
			p, err := makePlan(ctx, c, args[0], target)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if planOnly {
				if asJSON {
					return writeJSONOut(out, p)
				}
				p.print(out)
				return nil
			}
			if !asJSON && !yes {
				p.print(out)
			}
			if err := confirm(cmd, yes, "apply?"); err != nil {
				return err
			}
			m, err := c.CreateMigration(ctx, api.PlanRequest{Machine: args[0], Target: target})
			if err != nil {
				return withCode(refusalCode(err), err)
			}
			if !wait {
				if asJSON {
					return writeJSONOut(out, m)
				}
				fmt.Fprintf(out, "migration %s started: ferry status %s\n", m.ID, m.ID)
				return nil
			}
			final, err := waitMigrations(ctx, c, cmd.ErrOrStderr(), []string{m.ID}, isTerminal(os.Stderr) && !asJSON)
			if err != nil {
				return err
			}
			fm := final[m.ID]
			if asJSON {
				if err := writeJSONOut(out, fm); err != nil {
					return err
				}
			} else if d, ok := fm.Downtime(); ok {
				fmt.Fprintf(out, "migration %s %s; downtime %v\n", fm.ID, fm.State, d.Round(time.Millisecond))
			} else {
				fmt.Fprintf(out, "migration %s %s\n", fm.ID, fm.State)
			}
			return outcomeCode(final)
		},
	}
	mig.Flags().StringVar(&target, "to", "", "target worker")
	mig.Flags().BoolVar(&planOnly, "plan", false, "print the plan and change nothing")
	mig.Flags().BoolVar(&wait, "wait", false, "follow the migration with a progress bar until it ends")
	mig.Flags().BoolVarP(&yes, "yes", "y", false, "apply without asking")
	mig.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	addClientFlags(mig)

	var reason string
	var targetGone bool
	abort := &cobra.Command{
		Use:   "abort MIGRATION-ID",
		Short: "Roll a migration back (only before cutover; after it the refusal says why)",
		Args:  cobra.ExactArgs(1),
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, args []string) error {
			if targetGone {
				// The target's agent is gone for good while rolling back: the
				// operator vouches that the machine never ran there (true before
				// cutover) so the source may restart it.
				m, err := c.Propose(cmd.Context(), args[0], fsm.EvTargetTornDown, "operator-target-gone-"+args[0],
					fsm.EventPayload{Reason: reason})
				if err != nil {
					return withCode(refusalCode(err), err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "migration %s: target teardown confirmed by the operator; the source restarts the machine\n", m.ID)
				return nil
			}
			m, err := c.Abort(cmd.Context(), args[0], reason)
			if err != nil {
				return withCode(refusalCode(err), err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "migration %s is %s: the target tears down, then the machine restarts on %s\n", m.ID, m.State, m.Source)
			return nil
		}),
	}
	abort.Flags().StringVar(&reason, "reason", "operator abort", "why (recorded in the migration)")
	abort.Flags().BoolVar(&targetGone, "target-gone", false, "while rolling back with the target worker dead for good: confirm its teardown so the source restarts the machine")
	addClientFlags(abort)

	register(mig, abort)
}
