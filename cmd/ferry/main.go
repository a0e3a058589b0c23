// Command ferry moves a stateful machine and its encrypted local volume from
// one worker to another with seconds of downtime. One binary: the server, the
// agent, the operator CLI and the low-level tools. Each file in this folder
// builds one command (newXCmd): it parses flags and calls a package function.
package main

import (
	"fmt"
	"os"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/internal/logging"
)

// Exit codes shared by every command, so automation can tell outcomes apart.
const (
	ExitOK         = 0
	ExitFailed     = 1 // an operation failed
	ExitUsage      = 2 // bad flags or arguments
	ExitRefused    = 3 // the server refused (guard, lock, state)
	ExitRolledBack = 4 // a migration ended rolled back
)

var (
	flagLogLevel  string
	flagLogFormat string
)

// rootCmd is the whole command tree: the commands built in main and those
// a file still adds from init with register.
var rootCmd = newRootCmd()

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "ferry",
		Short:         "Move a machine and its encrypted local volume between workers: kill, clone, boot",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&flagLogLevel, "log-level", "info", "log level: debug, info, warn, error")
	root.PersistentFlags().StringVar(&flagLogFormat, "log-format", "", "log format: json or console (default: json for daemons, console for the CLI)")
	root.AddCommand(
		newVersionCmd(), newTLSCmd(), newFSMCmd(),
		newVolumeCmd(), newMachineCmd(), newMigrateCmd(), newAbortCmd(), newDrainCmd(), newWorkerCmd(), newStatusCmd(),
		newNetCmd(), newISCSICmd(), newLUKSCmd(), newWorkloadCmd(), newDemoCmd(),
	)
	return root
}

// register adds top-level commands from a file's init (agent, server, clone).
func register(cmds ...*cobra.Command) { rootCmd.AddCommand(cmds...) }

// newLogger builds the process logger. Daemons pass daemon=true to get JSON
// unless --log-format says otherwise.
func newLogger(daemon bool) (zerolog.Logger, error) {
	format := logging.Console
	if daemon {
		format = logging.JSON
	}
	if flagLogFormat != "" {
		format = logging.Format(flagLogFormat)
	}
	return logging.New(os.Stderr, format, flagLogLevel)
}

// exitError carries an exit code out of a command.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// withCode attaches an exit code to an error.
func withCode(code int, err error) error {
	if err == nil {
		return nil
	}
	return &exitError{code: code, err: err}
}

func main() {
	err := rootCmd.Execute()
	if err == nil {
		return
	}
	fmt.Fprintln(os.Stderr, "ferry:", err)
	if e, ok := err.(*exitError); ok {
		os.Exit(e.code)
	}
	os.Exit(ExitFailed)
}
