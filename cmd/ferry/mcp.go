package main

import (
	"fmt"
	"os"
	"os/signal"
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
	register(cmd)
}
