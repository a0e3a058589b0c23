package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

// version is set with -ldflags "-X main.version=..." by the Makefile.
var version = "dev"

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print ferry's version",
		Args:  cobra.NoArgs,
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), "ferry", version) },
	}
}
