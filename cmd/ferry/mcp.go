package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	ferrymcp "github.com/ferry-dev/ferry/mcp"
)

func init() {
	var cf clientFlags
	var httpAddr, allow string
	var allowRemote bool
	var planTTL time.Duration
	cmd := &cobra.Command{
		Use:   "mcp",
		Short: "Serve ferry's operator tools to an AI agent over MCP (stdio, or streamable HTTP with --http)",
		Long: `Serve ferry's operator tools over the Model Context Protocol, talking to the servers with your
certificate like any CLI command. Without --http it speaks on stdin/stdout (an MCP client starts it).
Every change is a *_plan tool that returns a plan token, then an *_apply tool that takes it; see docs/mcp.md.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			g, err := ferrymcp.ParseGroup(allow)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			if httpAddr != "" {
				if err := ferrymcp.CheckListenAddr(httpAddr, allowRemote); err != nil {
					return withCode(ExitUsage, err)
				}
			}
			log, err := newLogger(true) // stderr: stdout carries the protocol
			if err != nil {
				return withCode(ExitUsage, err)
			}
			c, err := cf.client()
			if err != nil {
				return err
			}
			defer c.Close()
			s, err := ferrymcp.New(c, ferrymcp.Options{Allow: g, PlanTTL: planTTL, Log: log, Version: version})
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			if httpAddr == "" {
				return s.ServeStdio(ctx, cmd.InOrStdin(), cmd.OutOrStdout())
			}
			// The token comes from the environment, not a flag, so it never shows in ps.
			if err := s.ListenAndServe(ctx, httpAddr, allowRemote, os.Getenv("FERRY_MCP_TOKEN")); err != nil {
				return fmt.Errorf("ferry mcp --http: %w", err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&httpAddr, "http", "", "serve streamable HTTP on this HOST:PORT instead of stdio (loopback only unless --http-allow-remote; requests must carry `Authorization: Bearer $FERRY_MCP_TOKEN` when it is set)")
	cmd.Flags().BoolVar(&allowRemote, "http-allow-remote", false, "allow --http on a non-loopback address (it has no authentication of its own: put your own in front)")
	cmd.Flags().StringVar(&allow, "allow", "read", "tool groups: read (lists, shows, statuses), write (+ create, migrate, drain), admin (+ destroy, abort)")
	cmd.Flags().DurationVar(&planTTL, "plan-ttl", ferrymcp.DefaultPlanTTL, "how long a plan token stays valid")
	cf.add(cmd, "operator")
	cmd.AddCommand(mcpInstallCmd())
	register(cmd)
}

// mcpInstallCmd is `ferry mcp install`: the client configuration entry that
// starts `ferry mcp` over stdio with these connection flags.
func mcpInstallCmd() *cobra.Command {
	var cf clientFlags
	var client, configPath, name, allow, command string
	var force, printOnly, asJSON bool
	cmd := &cobra.Command{
		Use:   "install --client " + strings.Join(ferrymcp.ClientNames(), "|"),
		Short: "Add ferry to an MCP client's configuration (Claude Desktop, Cursor, VS Code, Zed)",
		Long: `Write the entry that starts ` + "`ferry mcp`" + ` over stdio into an MCP client's JSON configuration, with the
connection flags given here (--server, --tls-dir, --cert) and the tool groups of --allow. Every other key of the file
is kept, in order. Running it again changes nothing; a different entry of the same name is replaced only with --force.
The file is replaced atomically (a reader sees the old or the new one, whole). A file that is not plain JSON (Zed's
settings with comments) is left alone and the entry printed to add by hand.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := ferrymcp.LookupClient(client)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			g, err := ferrymcp.ParseGroup(allow)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			if command == "" {
				if command, err = os.Executable(); err != nil {
					return withCode(ExitUsage, fmt.Errorf("find the ferry binary: %w (pass --command)", err))
				}
				if real, err := filepath.EvalSymlinks(command); err == nil {
					command = real
				}
			}
			// The client starts ferry from a directory of its own choosing.
			tlsDir, err := filepath.Abs(cf.tlsDir)
			if err != nil {
				return withCode(ExitUsage, fmt.Errorf("--tls-dir: %w", err))
			}
			e := ferrymcp.Entry{Command: command, Args: []string{"mcp", "--allow", g.String(), "--server", cf.server, "--tls-dir", tlsDir, "--cert", cf.name}}
			if configPath == "" {
				if configPath, err = c.DefaultPath(); err != nil {
					return withCode(ExitUsage, err)
				}
			}
			out := cmd.OutOrStdout()
			if printOnly {
				b, err := c.EntryJSON(e)
				if err != nil {
					return err
				}
				b, err = json.MarshalIndent(map[string]any{c.Key: map[string]json.RawMessage{name: b}}, "", "  ")
				if err != nil {
					return err
				}
				fmt.Fprintf(out, "%s\n", b)
				return nil
			}
			res, err := ferrymcp.Install(c, configPath, name, e, force)
			if errors.Is(err, ferrymcp.ErrEntryDiffers) {
				return withCode(ExitRefused, err)
			}
			if err != nil {
				return err
			}
			if asJSON {
				b, err := json.MarshalIndent(struct {
					Path     string          `json:"path"`
					Client   string          `json:"client"`
					Name     string          `json:"name"`
					Changed  bool            `json:"changed"`
					Replaced bool            `json:"replaced"`
					Entry    json.RawMessage `json:"entry"`
				}{res.Path, c.Name, name, res.Changed, res.Replace, json.RawMessage(res.Entry)}, "", "  ")
				if err != nil {
					return err
				}
				fmt.Fprintf(out, "%s\n", b)
				return nil
			}
			switch {
			case !res.Changed:
				fmt.Fprintf(out, "%s already has this %q entry; nothing to do\n", res.Path, name)
			case res.Replace:
				fmt.Fprintf(out, "replaced the %q entry in %s (%s):\n%s\n", name, res.Path, c.Doc, res.Entry)
			default:
				fmt.Fprintf(out, "added %q to %s (%s):\n%s\nrestart the client to load it\n", name, res.Path, c.Doc, res.Entry)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&client, "client", "", "the MCP client: "+strings.Join(ferrymcp.ClientNames(), ", "))
	cmd.Flags().StringVar(&configPath, "config", "", "the client's configuration file (default: the client's own for this user)")
	cmd.Flags().StringVar(&name, "name", "ferry", "the server's name in the client")
	cmd.Flags().StringVar(&allow, "allow", "read", "tool groups the client gets: read, write or admin")
	cmd.Flags().StringVar(&command, "command", "", "the ferry binary the client runs (default: this one)")
	cmd.Flags().BoolVar(&force, "force", false, "replace a different entry of the same name")
	cmd.Flags().BoolVar(&printOnly, "print", false, "print the entry instead of writing it")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print what was done as JSON (path, changed, replaced, entry)")
	_ = cmd.MarkFlagRequired("client")
	cf.add(cmd, "operator")
	return cmd
}
