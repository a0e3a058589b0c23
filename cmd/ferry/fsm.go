package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/fsm"
)

func newFSMCmd() *cobra.Command {
	fsmCmd := &cobra.Command{Use: "fsm", Short: "The migration state machine"}
	var format string
	var doc bool
	graph := &cobra.Command{
		Use:   "graph",
		Short: "Print the state machine diagram (mermaid or dot), or with --doc the whole docs/fsm.md",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var out string
			var err error
			if doc {
				out, err = fsm.FSMDoc()
			} else {
				out, err = fsm.Graph(format)
			}
			if err != nil {
				return withCode(ExitUsage, err)
			}
			fmt.Fprint(cmd.OutOrStdout(), out)
			return nil
		},
	}
	graph.Flags().StringVar(&format, "format", "mermaid", "mermaid or dot")
	graph.Flags().BoolVar(&doc, "doc", false, "print docs/fsm.md (diagram + transition table)")
	fsmCmd.AddCommand(graph)
	return fsmCmd
}
