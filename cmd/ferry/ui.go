package main

import (
	"context"
	"fmt"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/console"
	"github.com/ferry-dev/ferry/internal/tlsutil"
)

func init() {
	var listen, servers, tlsDir, cert string
	var hosts []string
	var allowNonLoopback bool
	cmd := &cobra.Command{
		Use:   "ui",
		Short: "Serve the on-call console (fleet, live migrations, volumes, abort) on loopback, with your operator certificate",
		Long: `Serve a web console on --listen (loopback only unless --allow-non-loopback) that talks to the
servers with the operator certificate in --tls-dir, like kubectl proxy. Open the printed URL in a
browser. Started with a socket passed in (systemd-socket-activate), it serves on that socket.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(false)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			tc, err := tlsutil.ClientConfig(tlsDir, cert)
			if err != nil {
				return withCode(ExitUsage, fmt.Errorf("the console uses your operator certificate %q in %s: %w", cert, tlsDir, err))
			}
			ln, err := console.Listen(listen, allowNonLoopback)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			c, err := console.New(console.Config{Servers: strings.Split(servers, ","), TLS: tc, Log: log, ExtraHosts: hosts})
			if err != nil {
				ln.Close()
				return withCode(ExitUsage, err)
			}
			defer c.Close()
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			fmt.Fprintf(cmd.OutOrStdout(), "ferry console at http://%s/ (Ctrl-C to stop)\n", ln.Addr())
			return c.Serve(ctx, ln)
		},
	}
	f := cmd.Flags()
	f.StringVar(&listen, "listen", console.DefaultListen, "address the console listens on (loopback unless --allow-non-loopback)")
	f.BoolVar(&allowNonLoopback, "allow-non-loopback", false, "allow a non-loopback --listen: anyone reaching it acts with your certificate")
	f.StringSliceVar(&hosts, "host", nil, "extra host names the console answers to (it refuses other Host headers against DNS rebinding)")
	f.StringVar(&servers, "server", envOr("FERRY_SERVER", "127.0.0.1:7400"), "server API address(es), comma-separated ($FERRY_SERVER)")
	f.StringVar(&tlsDir, "tls-dir", envOr("FERRY_TLS_DIR", "/etc/ferry/tls"), "directory made by `ferry tls` ($FERRY_TLS_DIR)")
	f.StringVar(&cert, "cert", envOr("FERRY_CERT", "operator"), "name of the operator certificate in --tls-dir ($FERRY_CERT)")
	register(cmd)
}
