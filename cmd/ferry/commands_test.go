package main

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/operator"
)

// walk calls f for every runnable command under c.
func walk(c *cobra.Command, f func(*cobra.Command)) {
	if c.Runnable() {
		f(c)
	}
	for _, sub := range c.Commands() {
		walk(sub, f)
	}
}

// noJSON lists the commands that talk to the server but print no record, or
// print JSON always, each with the reason; any other such command must take
// --json, so automation can read what every operator command prints.
var noJSON = map[string]string{
	"ferry agent":          "a daemon: it logs, it prints no record",
	"ferry server":         "a daemon: it logs, it prints no record",
	"ferry agent cleanup":  "tears down local state; prints no record",
	"ferry cluster remove": "prints one confirmation line; the server returns no record",
	"ferry volume show":    "prints the record as JSON always",
	"ferry mcp":            "a server speaking MCP (JSON-RPC) on stdio or HTTP; it prints no record",
	"ferry tls revoke":     "prints one confirmation line; the server returns no record",
	"ferry ui":             "a web console on loopback; it prints its URL, no record",
}

// TestRecordCommandsHaveJSON: every command that talks to the server (it
// takes --server) prints records, so it takes --json (docs/agent.md says so).
func TestRecordCommandsHaveJSON(t *testing.T) {
	var checked, missing []string
	walk(rootCmd, func(c *cobra.Command) {
		if c.Flags().Lookup("server") == nil && c.InheritedFlags().Lookup("server") == nil {
			return
		}
		path := c.CommandPath()
		if _, ok := noJSON[path]; ok {
			return
		}
		checked = append(checked, path)
		if c.Flags().Lookup("json") == nil && c.InheritedFlags().Lookup("json") == nil {
			missing = append(missing, path)
		}
	})
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("commands that print records without --json: %s", strings.Join(missing, ", "))
	}
	// The walk must reach the operator commands, or it checks nothing.
	for _, want := range []string{"ferry volume create", "ferry volume destroy", "ferry machine run", "ferry machine stop",
		"ferry migrate", "ferry abort", "ferry drain", "ferry status"} {
		found := false
		for _, c := range checked {
			found = found || c == want
		}
		if !found {
			t.Errorf("%s was not checked: does it still take --server?", want)
		}
	}
}

// TestNoJSONExceptionsExist keeps the exception list honest: each entry
// names a command that exists.
func TestNoJSONExceptionsExist(t *testing.T) {
	seen := map[string]bool{}
	walk(rootCmd, func(c *cobra.Command) { seen[c.CommandPath()] = true })
	for path := range noJSON {
		if !seen[path] {
			t.Errorf("noJSON names %q, which is not a command", path)
		}
	}
}

// run executes the command line on the real tree and returns its error.
func run(t *testing.T, args ...string) error {
	t.Helper()
	var out strings.Builder
	rootCmd.SetOut(&out)
	rootCmd.SetErr(&out)
	rootCmd.SetArgs(args)
	defer func() { rootCmd.SetArgs(nil); rootCmd.SetOut(nil); rootCmd.SetErr(nil) }()
	return rootCmd.Execute()
}

// `volume create --size 1GiB` was refused by a hand-written parser; every
// size flag now goes through internal/bytesize.
func TestVolumeCreateSizeFlag(t *testing.T) {
	noTLS := t.TempDir() + "/none"
	for _, size := range []string{"1GiB", "1G", "512MiB", "100GiB"} {
		err := run(t, "volume", "create", "v1", "--worker", "w1", "--size", size, "--tls-dir", noTLS)
		if err == nil || strings.Contains(err.Error(), "size") {
			t.Errorf("--size %s: %v; want it accepted (and the missing certificate reported)", size, err)
		}
	}
	for _, size := range []string{"1GX", "lots", "0", "-1G"} {
		err := run(t, "volume", "create", "v1", "--worker", "w1", "--size", size, "--tls-dir", noTLS)
		var e *exitError
		if err == nil || !strings.Contains(err.Error(), "--size") || !errors.As(err, &e) || e.code != ExitUsage {
			t.Errorf("--size %s: %v; want a usage error naming --size", size, err)
		}
	}
}

func TestExitCodes(t *testing.T) {
	for _, c := range []struct {
		err  error
		want int
	}{
		{fmt.Errorf("x: %w", operator.ErrInvalid), ExitUsage},
		{fmt.Errorf("x: %w", operator.ErrRefused), ExitRefused},
		{fmt.Errorf("create: %w", &api.Error{Kind: fsm.RefuseConflict, Code: "locked"}), ExitRefused},
		{&api.Error{Kind: fsm.RefuseInternal}, ExitFailed},
		{errors.New("connection refused"), ExitFailed},
	} {
		if got := exitCode(c.err); got != c.want {
			t.Errorf("exitCode(%v) = %d, want %d", c.err, got, c.want)
		}
	}
}
