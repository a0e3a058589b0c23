package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/operator"
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

// outcomeCode gives the "rolled back" exit code when any of ms rolled back.
func outcomeCode(ms map[string]*fsm.Migration) error {
	if rolled := operator.RolledBack(ms); len(rolled) > 0 {
		return withCode(ExitRolledBack, fmt.Errorf("rolled back: %s", strings.Join(rolled, "; ")))
	}
	return nil
}

func newMigrateCmd() *cobra.Command {
	var target string
	var planOnly, wait, yes, asJSON bool
	var maxDowntime time.Duration
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
			p, err := operator.MakeMigrationPlan(ctx, c, args[0], target)
			if err != nil {
				return withCode(exitCode(err), err)
			}
			out := cmd.OutOrStdout()
			if planOnly {
				if asJSON {
					return writeJSONOut(out, p)
				}
				p.Print(out)
				return nil
			}
			if !asJSON && !yes {
				p.Print(out)
			}
			if err := confirm(cmd, yes, "apply?"); err != nil {
				return err
			}
			m, err := c.CreateMigration(ctx, api.PlanRequest{Machine: args[0], Target: target, MaxDowntime: api.Duration(maxDowntime)})
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
			final, err := operator.FollowMigrations(ctx, c, cmd.ErrOrStderr(), []string{m.ID}, isTerminal(os.Stderr) && !asJSON)
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
	mig.Flags().DurationVar(&maxDowntime, "max-downtime", fsm.DefaultMaxDowntime, "downtime budget: if the steps from stopping the machine to cutover take longer, the migration rolls back and the machine restarts on the source")
	mig.Flags().BoolVar(&planOnly, "plan", false, "print the plan and change nothing")
	mig.Flags().BoolVar(&wait, "wait", false, "follow the migration with a progress bar until it ends")
	mig.Flags().BoolVarP(&yes, "yes", "y", false, "apply without asking")
	mig.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	addClientFlags(mig)
	return mig
}

func newAbortCmd() *cobra.Command {
	var reason string
	var asJSON bool
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
				if asJSON {
					return writeJSONOut(cmd.OutOrStdout(), m)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "migration %s: target teardown confirmed by the operator; the source restarts the machine\n", m.ID)
				return nil
			}
			m, err := c.Abort(cmd.Context(), args[0], reason)
			if err != nil {
				return withCode(refusalCode(err), err)
			}
			if asJSON {
				return writeJSONOut(cmd.OutOrStdout(), m)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "migration %s is %s: the target tears down, then the machine restarts on %s\n", m.ID, m.State, m.Source)
			return nil
		}),
	}
	abort.Flags().StringVar(&reason, "reason", "operator abort", "why (recorded in the migration)")
	abort.Flags().BoolVar(&targetGone, "target-gone", false, "while rolling back with the target worker dead for good: confirm its teardown so the source restarts the machine")
	abort.Flags().BoolVar(&asJSON, "json", false, "print the migration record as JSON")
	addClientFlags(abort)
	return abort
}
