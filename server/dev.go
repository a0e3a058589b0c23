package server

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

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
		Bootstrap: true, TLSDir: tlsDir, HeartbeatTimeout: 500 * time.Millisecond, ElectionTimeout: 500 * time.Millisecond})
}

// EnsureCerts creates a CA in dir if missing and issues each named
// certificate (name -> kind: server, worker, operator) that does not exist yet.
func EnsureCerts(dir string, certs map[string]string) error {
	if _, err := os.Stat(filepath.Join(dir, "ca.pem")); err != nil {
		if err := tlsutil.InitCA(dir); err != nil {
			return err
		}
	}
	for name, kind := range certs {
		if c, _ := tlsutil.Files(dir, name); fileExists(c) {
			continue
		}
		if err := tlsutil.Issue(dir, name, kind, nil); err != nil {
			return err
		}
	}
	return nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
