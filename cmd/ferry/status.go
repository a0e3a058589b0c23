package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

func init() {
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
				return watchMigration(cmd.Context(), c, args[0], out)
			}
			if len(args) == 1 {
				m, err := c.GetMigration(ctx, args[0])
				if err != nil {
					return withCode(ExitFailed, err)
				}
				if asJSON {
					return writeJSONOut(out, m)
				}
				printMigration(out, m, time.Now())
				return nil
			}
			ms, err := c.ListMigrations(ctx, worker)
			if err != nil {
				return withCode(ExitFailed, err)
			}
			if asJSON {
				return writeJSONOut(out, ms)
			}
			printMigrations(out, ms, time.Now())
			if worker == "" {
				if ds, err := c.ListDrains(ctx, ""); err == nil {
					printDrains(out, ds, time.Now())
				}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().StringVar(&worker, "worker", "", "only migrations naming this worker")
	cmd.Flags().BoolVar(&watch, "watch", false, "with an ID: print each change until the migration ends (blocking queries, no polling)")
	addClientFlags(cmd)
	register(cmd)
}

// watchMigration prints a line per change of migration id until it ends;
// the exit code says how it ended.
func watchMigration(ctx context.Context, c *api.Client, id string, out io.Writer) error {
	var idx uint64
	last := ""
	for {
		m, next, err := c.WatchMigration(ctx, id, idx)
		if err != nil {
			return withCode(ExitFailed, err)
		}
		idx = next
		line := fmt.Sprintf("%s  %-16s %s", time.Now().Format(time.TimeOnly), m.State, progressText(m))
		if m.Stalled {
			line += "  STALLED: " + m.StallCause
		}
		if line[9:] != last {
			fmt.Fprintln(out, line)
			last = line[9:]
		}
		switch m.State {
		case fsm.Completed:
			if d, ok := m.Downtime(); ok {
				fmt.Fprintf(out, "completed; downtime %s\n", d)
			}
			return nil
		case fsm.RolledBack:
			return withCode(ExitRolledBack, fmt.Errorf("migration %s rolled back: %s", m.ID, m.Rollback.Reason))
		}
	}
}

func writeJSONOut(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func age(d time.Duration) string {
	switch {
	case d < time.Minute:
		return d.Round(time.Second).String()
	case d < time.Hour:
		return d.Round(time.Minute).String()
	}
	return d.Round(time.Hour).String()
}

func progressText(m *fsm.Migration) string {
	p := m.Progress
	if p == nil || p.TotalBytes == 0 {
		return "-"
	}
	s := fmt.Sprintf("%.0f%%", p.Percent())
	if p.RateBPS > 0 {
		s += fmt.Sprintf(" %.1f MiB/s", float64(p.RateBPS)/(1<<20))
	}
	if p.ETASeconds > 0 && p.HydratedBytes < p.TotalBytes {
		s += " eta " + (time.Duration(p.ETASeconds) * time.Second).String()
	}
	return s
}

func printMigrations(w io.Writer, ms []*fsm.Migration, now time.Time) {
	if len(ms) == 0 {
		fmt.Fprintln(w, "no migrations")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tMACHINE\tVOLUME\tSTATE\tSOURCE -> TARGET\tAGE\tPROGRESS\tNOTE")
	for _, m := range ms {
		note := ""
		if m.Stalled {
			note = "STALLED: " + m.StallCause
		} else if m.Rollback != nil {
			note = "rollback: " + m.Rollback.Reason
		} else if m.LastError != "" {
			note = "last error: " + m.LastError
		}
		if len(note) > 60 {
			note = note[:57] + "..."
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s -> %s\t%s\t%s\t%s\n", m.ID, m.Machine, m.Volume, m.State, m.Source, m.Target,
			age(now.Sub(m.CreatedAt)), progressText(m), note)
	}
	tw.Flush()
}

func printMigration(w io.Writer, m *fsm.Migration, now time.Time) {
	fmt.Fprintf(w, "migration %s: machine %s, volume %s, %s -> %s\n", m.ID, m.Machine, m.Volume, m.Source, m.Target)
	fmt.Fprintf(w, "state:     %s (age %s, attempts %d)\n", m.State, age(now.Sub(m.CreatedAt)), m.Attempts)
	if d, ok := m.Downtime(); ok {
		fmt.Fprintf(w, "downtime:  %s (source_stopped -> cutover)\n", d)
	}
	fmt.Fprintf(w, "progress:  %s\n", progressText(m))
	if m.Stalled {
		fmt.Fprintf(w, "STALLED:   %s\n", m.StallCause)
	}
	if m.LastError != "" {
		fmt.Fprintf(w, "last error: %s\n", m.LastError)
	}
	if m.Rollback != nil {
		fmt.Fprintf(w, "rollback:  %s (by %s from %s; target torn down %v, source restored %v)\n", m.Rollback.Reason, m.Rollback.By,
			m.Rollback.From, m.Rollback.TargetTornDown, m.Rollback.SourceRestored)
	}
	if m.Export != nil {
		fmt.Fprintf(w, "export:    %s %s\n", m.Export.Portal, m.Export.IQN)
	}
	if m.Old6PN != "" || m.New6PN != "" {
		fmt.Fprintf(w, "6PN:       %s -> %s\n", m.Old6PN, m.New6PN)
	}
	var b strings.Builder
	for _, st := range fsm.AllStates {
		if t, ok := m.EnteredAt[st]; ok {
			fmt.Fprintf(&b, "  %-16s %s\n", st, t.UTC().Format(time.RFC3339Nano))
		}
	}
	fmt.Fprintf(w, "timeline:\n%s", b.String())
}
