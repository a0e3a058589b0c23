package main

import (
	"context"
	"fmt"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/api"
)

func init() {
	var cfg api.Config
	var join string
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run a ferry server: a raft voter holding the migration state machine, serving the /v1 API over mTLS",
		Long: `Run a ferry server. One node for development (--bootstrap), three or five in production:
start the first with --bootstrap, the others with --join <API address of any member>.
Writes sent to a follower are forwarded to the leader.`,
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
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			s, err := api.StartServer(ctx, log, cfg)
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
	register(cmd)
}
