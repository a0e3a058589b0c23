package main

import (
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/operator"
	"github.com/ferry-dev/ferry/machine"
)

func newMachineCmd() *cobra.Command {
	mc := &cobra.Command{Use: "machine", Short: "Run, list and stop machines (the exec driver)"}
	mc.AddCommand(newMachineRunCmd(), newMachineListCmd(),
		newMachineStateCmd("stop", "Stop a machine (kill signal, then SIGKILL after its timeout)", fsm.MachineStopped),
		newMachineStateCmd("start", "Start a stopped machine", fsm.MachineRunning))
	return mc
}

func newMachineRunCmd() *cobra.Command {
	var worker, volume, killSignal string
	var org, number uint32
	var killTimeout time.Duration
	var env map[string]string
	var runJSON bool
	run := &cobra.Command{
		Use:   "run ID --worker W --volume V --org N --number N -- COMMAND [ARGS...]",
		Short: "Run COMMAND as a machine on a worker with its volume mounted ($FERRY_VOLUME_DIR) and a 6PN address ($FERRY_6PN)",
		Args:  cobra.MinimumNArgs(2),
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, args []string) error {
			m, err := operator.RunMachine(cmd.Context(), c, operator.MachineRequest{
				ID: args[0], Worker: worker, Volume: volume, Org: org, Number: number,
				Spec: machine.Spec{Command: args[1:], Env: env, KillSignal: killSignal, KillTimeout: killTimeout},
			})
			if err != nil {
				return withCode(exitCode(err), err)
			}
			if runJSON {
				return writeJSONOut(cmd.OutOrStdout(), m)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "machine %s on %s with volume %s at %s\n", m.ID, m.Worker, m.Volume, m.Addr6PN)
			return nil
		}),
	}
	run.Flags().StringVar(&worker, "worker", "", "worker to run on (where the volume is)")
	run.Flags().StringVar(&volume, "volume", "", "the machine's volume")
	run.Flags().Uint32Var(&org, "org", 1, "private network (org) id: the ORG bits of the 6PN address")
	run.Flags().Uint32Var(&number, "number", 1, "machine number: the MACHINE bits of the 6PN address")
	run.Flags().StringVar(&killSignal, "kill-signal", "SIGINT", "signal that asks the machine to stop")
	run.Flags().DurationVar(&killTimeout, "kill-timeout", 5*time.Second, "then SIGKILL")
	run.Flags().StringToStringVar(&env, "env", nil, "extra environment (k=v,...)")
	run.Flags().BoolVar(&runJSON, "json", false, "print the machine record as JSON")
	addClientFlags(run)
	return run
}

func newMachineListCmd() *cobra.Command {
	var worker string
	var asJSON bool
	list := &cobra.Command{
		Use:   "list",
		Short: "List machines",
		Args:  cobra.NoArgs,
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, _ []string) error {
			ms, err := c.ListMachines(cmd.Context(), worker)
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSONOut(cmd.OutOrStdout(), ms)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tWORKER\tVOLUME\tSTATE\t6PN\tMIGRATED\tCRASHES")
			for _, m := range ms {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%v\t%d\n", m.ID, m.Worker, m.Volume, m.State, m.Addr6PN, m.Migrated, m.Crashes)
			}
			return tw.Flush()
		}),
	}
	list.Flags().StringVar(&worker, "worker", "", "only machines of this worker")
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	addClientFlags(list)
	return list
}

// newMachineStateCmd builds a command that sets the machine's wanted state.
func newMachineStateCmd(use, short string, st fsm.MachineState) *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   use + " ID",
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, args []string) error {
			m, err := c.UpdateMachine(cmd.Context(), args[0], api.MachineUpdate{State: &st})
			if err != nil {
				return withCode(refusalCode(err), err)
			}
			if asJSON {
				return writeJSONOut(cmd.OutOrStdout(), m)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "machine %s: %s (its agent applies it)\n", m.ID, m.State)
			return nil
		}),
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print the machine record as JSON")
	addClientFlags(c)
	return c
}
