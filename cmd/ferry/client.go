package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/internal/tlsutil"
)

// clientFlags are the agent's own connection flags (its certificate is the
// worker's, not the operator's that addClientFlags defaults to).
type clientFlags struct {
	server string
	tlsDir string
	name   string // certificate name
}

func (f *clientFlags) add(cmd *cobra.Command, defaultName string) {
	cmd.Flags().StringVar(&f.server, "server", envOr("FERRY_SERVER", "127.0.0.1:7400"), "server API address(es), comma-separated ($FERRY_SERVER)")
	cmd.Flags().StringVar(&f.tlsDir, "tls-dir", envOr("FERRY_TLS_DIR", "/etc/ferry/tls"), "directory made by `ferry tls` ($FERRY_TLS_DIR)")
	cmd.Flags().StringVar(&f.name, "cert", envOr("FERRY_CERT", defaultName), "certificate name in --tls-dir ($FERRY_CERT)")
}

func (f *clientFlags) client() (*api.Client, error) {
	return f.clientDenying(nil)
}

// clientDenying is client() refusing servers whose certificate serial
// revoked reports (nil: no check), on every handshake.
func (f *clientFlags) clientDenying(revoked func(serial string) bool) (*api.Client, error) {
	tc, err := tlsutil.ClientConfig(f.tlsDir, f.name)
	if err != nil {
		return nil, withCode(ExitUsage, fmt.Errorf("load certificate %q from %s: %w (make one with `ferry tls issue`)", f.name, f.tlsDir, err))
	}
	if revoked != nil {
		tc = tlsutil.WithDenyList(tc, revoked)
	}
	return api.NewClient([]string{f.server}, tc)
}

// apiRunE wraps the body of a command that talks to the server: it builds
// the client from the shared flags (addClientFlags) and closes it after.
func apiRunE(run func(cmd *cobra.Command, c *api.Client, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		c, err := newAPIClient()
		if err != nil {
			return err
		}
		defer c.Close()
		return run(cmd, c, args)
	}
}
