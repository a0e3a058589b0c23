package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/internal/tlsutil"
)

// Client flags shared by every command that talks to the server
// (status, migrate, drain, abort, volume, ...): add them with
// addClientFlags and build the client with newAPIClient.
var (
	flagServers  string
	flagTLSDir   string
	flagCertName string
)

// addClientFlags adds --server, --tls-dir and --cert to cmd. Defaults come
// from FERRY_SERVER, FERRY_TLS_DIR and FERRY_CERT.
func addClientFlags(cmd *cobra.Command) {
	cmd.Flags().StringVar(&flagServers, "server", envOr("FERRY_SERVER", "127.0.0.1:7400"), "server API address(es), comma-separated ($FERRY_SERVER)")
	cmd.Flags().StringVar(&flagTLSDir, "tls-dir", envOr("FERRY_TLS_DIR", "/etc/ferry/tls"), "directory made by `ferry tls` ($FERRY_TLS_DIR)")
	cmd.Flags().StringVar(&flagCertName, "cert", envOr("FERRY_CERT", "operator"), "name of the client certificate in --tls-dir ($FERRY_CERT)")
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// newAPIClient builds the API client from the client flags.
func newAPIClient() (*api.Client, error) {
	tc, err := tlsutil.ClientConfig(flagTLSDir, flagCertName)
	if err != nil {
		return nil, withCode(ExitUsage, err)
	}
	c, err := api.NewClient(strings.Split(flagServers, ","), tc)
	if err != nil {
		return nil, withCode(ExitUsage, err)
	}
	return c, nil
}

func newTLSCmd() *cobra.Command {
	tlsCmd := &cobra.Command{Use: "tls", Short: "Make the development CA and certificates for mTLS between every process"}
	var dir string
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "Create a CA in --dir (ca.pem, ca-key.pem)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := tlsutil.InitCA(dir); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "CA written to %s\n", dir)
			return nil
		},
	}
	initCmd.Flags().StringVar(&dir, "dir", "/etc/ferry/tls", "directory for the CA and certificates")
	var name, role string
	var hosts []string
	issueCmd := &cobra.Command{
		Use:   "issue",
		Short: "Issue a certificate: --name is the identity (worker, server or operator name), --role its kind",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if name == "" {
				return withCode(ExitUsage, fmt.Errorf("--name is required"))
			}
			if err := tlsutil.Issue(dir, name, role, hosts); err != nil {
				return withCode(ExitUsage, err)
			}
			c, k := tlsutil.Files(dir, name)
			fmt.Fprintf(cmd.OutOrStdout(), "%s certificate for %s: %s, key %s\n", role, name, c, k)
			return nil
		},
	}
	issueCmd.Flags().StringVar(&dir, "dir", "/etc/ferry/tls", "directory holding the CA")
	issueCmd.Flags().StringVar(&name, "name", "", "identity: the worker, server or operator name (certificate CN)")
	issueCmd.Flags().StringVar(&role, "role", "worker", "server, worker or operator")
	issueCmd.Flags().StringSliceVar(&hosts, "host", nil, "extra DNS names or IPs for the certificate")
	tlsCmd.AddCommand(initCmd, issueCmd)
	return tlsCmd
}
