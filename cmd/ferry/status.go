package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/operator"
)

func newStatusCmd() *cobra.Command {
	var asJSON, watch bool
	var worker string
	cmd := &cobra.Command{
		Use:   "status [MIGRATION-ID]",
		Short: "Show migrations: state, source -> target, age, progress (one migration in detail with an ID)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newAPIClient()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			out := cmd.OutOrStdout()
			if len(args) == 1 && watch {
				m, err := operator.WatchMigration(cmd.Context(), c, args[0], out)
				if err != nil {
					return withCode(ExitFailed, err)
				}
				if m.State == fsm.RolledBack {
					reason := ""
					if m.Rollback != nil {
						reason = ": " + m.Rollback.Reason
					}
					return withCode(ExitRolledBack, fmt.Errorf("migration %s rolled back%s", m.ID, reason))
				}
				return nil
			}
			if len(args) == 1 {
				m, err := c.GetMigration(ctx, args[0])
				if err != nil {
					return withCode(ExitFailed, err)
				}
				if asJSON {
					return writeJSONOut(out, m)
				}
				operator.PrintMigration(out, m, time.Now())
				return nil
			}
			ms, err := c.ListMigrations(ctx, worker)
			if err != nil {
				return withCode(ExitFailed, err)
			}
			if asJSON {
				return writeJSONOut(out, ms)
			}
			operator.PrintMigrations(out, ms, time.Now())
			if worker == "" {
				if ds, err := c.ListDrains(ctx, ""); err == nil {
					printDrains(out, ds, time.Now())
				}
			}
			// Machines the restart policy gave up on need a person.
			if machs, err := c.ListMachines(ctx, worker); err == nil {
				for _, m := range machs {
					if m.State == fsm.MachineFailed {
						fmt.Fprintf(out, "machine %s on %s FAILED after %d crashes: fix it, then `ferry machine start %s`\n", m.ID, m.Worker, m.Crashes, m.ID)
					}
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().StringVar(&worker, "worker", "", "only migrations naming this worker")
	cmd.Flags().BoolVar(&watch, "watch", false, "with an ID: print each change until the migration ends (blocking queries, no polling)")
	addClientFlags(cmd)
	return cmd
}

func writeJSONOut(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
