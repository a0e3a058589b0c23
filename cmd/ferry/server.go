package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/internal/failpoint"
	"github.com/ferry-dev/ferry/server"
)

func init() {
	var cfg server.Config
	var join string
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run a ferry server: a raft voter holding the migration state machine, serving the /v1 API over mTLS",
		Long: `Run a ferry server. One node for development (--bootstrap), three or five in production:
start the first with --bootstrap, the others with --join <API address of any member>.
A follower answers writes with the leader's address; clients send them there themselves.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(true)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			if cfg.Bootstrap && join != "" {
				return withCode(ExitUsage, fmt.Errorf("use --bootstrap for the first server or --join for the others, not both"))
			}
			if cfg.ID == "" {
				return withCode(ExitUsage, fmt.Errorf("--name is required (it is also the certificate name in --tls-dir)"))
			}
			if join != "" {
				cfg.Join = strings.Split(join, ",")
			}
			if fp := os.Getenv(failpoint.PauseBeforeEnv); fp != "" {
				if cfg.PauseBefore, err = failpoint.ParsePauseBefore(fp); err != nil {
					return withCode(ExitUsage, err)
				}
				log.Warn().Str("failpoints", fp).Msg("failpoints set: housekeeping holds migrations (tests only)")
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			s, err := server.StartServer(ctx, log, cfg)
			if err != nil {
				return err
			}
			<-ctx.Done()
			return s.Close()
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.ID, "name", "", "server name: raft ID and certificate name (CN) in --tls-dir")
	f.StringVar(&cfg.DataDir, "data-dir", "/var/lib/ferry/server", "raft log, stable store and snapshots")
	f.StringVar(&cfg.Listen, "listen", "127.0.0.1:7400", "HTTP API address (mTLS)")
	f.StringVar(&cfg.Advertise, "advertise", "", "API address other servers reach this one at (default: --listen)")
	f.StringVar(&cfg.RaftAddr, "raft-addr", "127.0.0.1:7401", "raft transport address (mTLS); must be reachable by the other servers")
	f.BoolVar(&cfg.Bootstrap, "bootstrap", false, "start a new cluster with this server as its only voter")
	f.StringVar(&join, "join", "", "API address(es) of an existing cluster's servers, comma-separated")
	f.StringVar(&cfg.TLSDir, "tls-dir", "/etc/ferry/tls", "directory made by `ferry tls` holding ca.pem and <name>.pem")
	f.DurationVar(&cfg.GCRetention, "gc-retention", server.DefaultGCRetention, "how long terminal migrations, ended drains and destroyed volumes stay readable before they are deleted")
	f.Float64Var(&cfg.WriteRate, "write-rate", server.DefaultWriteRate, "writes per second each certificate may make")
	f.IntVar(&cfg.WriteBurst, "write-burst", server.DefaultWriteBurst, "writes each certificate may make in a burst")
	register(cmd)
}

func init() {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Show the servers: the answering server's raft state, the leader, the voters and their API addresses",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := newAPIClient()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), 15*time.Second)
			defer cancel()
			st, err := c.Status(ctx)
			if err != nil {
				return withCode(ExitFailed, err)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return writeJSONOut(out, st)
			}
			fmt.Fprintf(out, "answered by %s (%s), leader %s at %s, applied index %d\n", st.ID, st.RaftState, st.Leader, st.LeaderAPI, st.Index)
			for _, m := range st.Servers {
				role := "follower"
				if m.ID == st.Leader {
					role = "leader"
				}
				if !slices.Contains(st.Voters, m.ID) {
					role = "not a voter"
				}
				fmt.Fprintf(out, "  %-12s api %-22s raft %-22s %s\n", m.ID, m.APIAddr, m.RaftAddr, role)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	addClientFlags(cmd)
	remove := &cobra.Command{
		Use:   "remove NAME",
		Short: "Remove a dead server from the raft cluster (before replacing it); operator certificate",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newAPIClient()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			if err := c.RemoveServer(ctx, args[0]); err != nil {
				return withCode(ExitFailed, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "server %s removed\n", args[0])
			return nil
		},
	}
	addClientFlags(remove)
	cmd.AddCommand(remove)
	register(cmd)
}
