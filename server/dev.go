package server

import (
	"context"
	"fmt"
	"net"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/tlsutil"
)

// StartDev runs a one-node development server (the `ferry agent --dev`
// case): it creates a CA in tlsDir when there is none, issues the server
// certificate "server" (and an "operator" certificate for the CLI), and
// bootstraps a cluster in dataDir. listen "" picks free loopback ports.
func StartDev(ctx context.Context, log zerolog.Logger, dataDir, tlsDir, listen string) (*Server, error) {
	if err := EnsureCerts(tlsDir, map[string]string{"server": tlsutil.KindServer, "operator": tlsutil.KindOperator}); err != nil {
		return nil, err
	}
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, fmt.Errorf("listen address %q: %w", listen, err)
	}
	return StartServer(ctx, log, Config{ID: "server", DataDir: dataDir, Listen: listen, RaftAddr: net.JoinHostPort(host, "0"),
		Bootstrap: true, TLSDir: tlsDir})
}

// EnsureCerts makes the development CA next to dir (tlsutil.DevCADir,
// never inside it) if missing and issues into dir each named certificate
// (name -> kind: server, worker, operator) that does not exist yet.
func EnsureCerts(dir string, certs map[string]string) error {
	var list []tlsutil.Cert
	for name, kind := range certs {
		list = append(list, tlsutil.Cert{Name: name, Kind: kind})
	}
	return tlsutil.EnsureDev(dir, list...)
}
