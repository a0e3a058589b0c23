package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
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

// Certificate lifecycle. The CA lives in its own folder on the CA host
// (default /etc/ferry/ca); hosts make their keys in their --tls-dir (default
// /etc/ferry/tls) and send only CSRs; the CA host signs after checking the
// identity asked for against its own flags. `issue` is the one-host
// shortcut for development and demos.
const defaultCADir = "/etc/ferry/ca"

func newTLSCmd() *cobra.Command {
	tlsCmd := &cobra.Command{Use: "tls", Short: "Certificates for mTLS between every process: CA, CSRs, signing, renewal, revocation"}
	tlsCmd.AddCommand(tlsInitCmd(), tlsCSRCmd(), tlsSignCmd(), tlsInstallCmd(), tlsIssueCmd(), tlsRenewCmd(), tlsRevokeCmd(), tlsRevokedCmd())
	return tlsCmd
}

func tlsInitCmd() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create a CA in --dir (ca.pem, ca-key.pem) on the CA host; never a process's --tls-dir",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := tlsutil.InitCA(dir); err != nil {
				return withCode(ExitFailed, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "CA written to %s; copy only its ca.pem to each host's --tls-dir\n", dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", defaultCADir, "the CA's own folder")
	return cmd
}

func tlsCSRCmd() *cobra.Command {
	var dir, name, role string
	var hosts []string
	var force bool
	cmd := &cobra.Command{
		Use:   "csr --name NAME --role ROLE",
		Short: "On the host that will use it: make a private key (0600) and a CSR to send to the CA host",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			csr, err := tlsutil.NewCSR(dir, name, role, hosts, force)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			_, k := tlsutil.Files(dir, name)
			fmt.Fprintf(cmd.OutOrStdout(), "key %s (stays here), CSR %s: sign it on the CA host with `ferry tls sign --csr %s --name %s --role %s`\n",
				k, csr, filepath.Base(csr), name, role)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", envOr("FERRY_TLS_DIR", "/etc/ferry/tls"), "this host's runtime TLS folder ($FERRY_TLS_DIR)")
	f.StringVar(&name, "name", "", "identity: the worker, server or operator name (certificate CN)")
	f.StringVar(&role, "role", "", "server, worker or operator")
	f.StringSliceVar(&hosts, "host", nil, "extra DNS names or IPs for the certificate")
	f.BoolVar(&force, "force", false, "replace an existing key")
	cmd.MarkFlagRequired("name")
	cmd.MarkFlagRequired("role")
	return cmd
}

func tlsSignCmd() *cobra.Command {
	var caDir, csrPath, out, name, role string
	var hosts []string
	var validity time.Duration
	var force bool
	cmd := &cobra.Command{
		Use:   "sign --csr FILE --name NAME --role ROLE",
		Short: "On the CA host: sign a CSR after checking it asks for exactly --name, --role and --host",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			csr, err := os.ReadFile(csrPath)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			cert, serial, err := tlsutil.Sign(caDir, csr, tlsutil.SignRequest{Name: name, Kind: role, Hosts: hosts, Validity: validity})
			if err != nil {
				return withCode(ExitFailed, err)
			}
			if out == "" {
				out = filepath.Join(filepath.Dir(csrPath), name+".pem")
			}
			if err := tlsutil.WriteFileAtomic(out, cert, 0o644, force); err != nil {
				return withCode(ExitFailed, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s certificate for %s: %s, serial %s; install it on the host with `ferry tls install --name %s --cert %s`\n",
				role, name, out, serial, name, filepath.Base(out))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&caDir, "ca-dir", defaultCADir, "the CA's folder")
	f.StringVar(&csrPath, "csr", "", "the CSR made by `ferry tls csr`")
	f.StringVar(&out, "out", "", "where to write the certificate (default NAME.pem next to the CSR)")
	f.StringVar(&name, "name", "", "the identity you approve; the CSR must ask for exactly it")
	f.StringVar(&role, "role", "", "the role you approve: server, worker or operator")
	f.StringSliceVar(&hosts, "host", nil, "extra DNS names or IPs you approve")
	f.DurationVar(&validity, "validity", tlsutil.DefaultValidity, "how long the certificate lives")
	f.BoolVar(&force, "force", false, "replace an existing certificate file")
	cmd.MarkFlagRequired("csr")
	cmd.MarkFlagRequired("name")
	cmd.MarkFlagRequired("role")
	return cmd
}

func tlsInstallCmd() *cobra.Command {
	var dir, name, certPath, caPath string
	var force bool
	cmd := &cobra.Command{
		Use:   "install --name NAME --cert FILE",
		Short: "On the host: install a signed certificate after checking it matches the key here and chains to ca.pem",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if caPath != "" {
				b, err := os.ReadFile(caPath)
				if err != nil {
					return withCode(ExitUsage, err)
				}
				if err := tlsutil.WriteFileAtomic(filepath.Join(dir, "ca.pem"), b, 0o644, force); err != nil {
					return withCode(ExitFailed, err)
				}
			}
			cert, err := os.ReadFile(certPath)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			if err := tlsutil.InstallCert(dir, name, cert, force); err != nil {
				return withCode(ExitFailed, err)
			}
			c, _ := tlsutil.Files(dir, name)
			fmt.Fprintf(cmd.OutOrStdout(), "installed %s\n", c)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", envOr("FERRY_TLS_DIR", "/etc/ferry/tls"), "this host's runtime TLS folder ($FERRY_TLS_DIR)")
	f.StringVar(&name, "name", "", "the identity (certificate CN)")
	f.StringVar(&certPath, "cert", "", "the certificate `ferry tls sign` wrote")
	f.StringVar(&caPath, "ca", "", "the CA certificate (ca.pem) to install too")
	f.BoolVar(&force, "force", false, "replace an existing certificate (and ca.pem)")
	cmd.MarkFlagRequired("name")
	cmd.MarkFlagRequired("cert")
	return cmd
}

func tlsIssueCmd() *cobra.Command {
	var caDir, dir, name, role string
	var hosts []string
	var validity time.Duration
	var force bool
	cmd := &cobra.Command{
		Use:   "issue --name NAME --role ROLE",
		Short: "Development shortcut on one host: csr + sign + install into --dir with the CA in --ca-dir",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if caDir == "" {
				caDir = defaultCADir
				if _, err := os.Stat(filepath.Join(tlsutil.DevCADir(dir), "ca.pem")); err == nil {
					caDir = tlsutil.DevCADir(dir) // a development CA next to --dir
				}
			}
			serial, err := tlsutil.Issue(caDir, dir, name, role, hosts, tlsutil.IssueOptions{Force: force, Validity: validity})
			if err != nil {
				return withCode(ExitUsage, err)
			}
			c, k := tlsutil.Files(dir, name)
			fmt.Fprintf(cmd.OutOrStdout(), "%s certificate for %s: %s, key %s, serial %s\n", role, name, c, k, serial)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&caDir, "ca-dir", "", "the CA's folder (default: DIR-ca when it holds a CA, as `ferry agent --dev` makes it, else /etc/ferry/ca)")
	f.StringVar(&dir, "dir", envOr("FERRY_TLS_DIR", "/etc/ferry/tls"), "runtime TLS folder to write the key and certificate into ($FERRY_TLS_DIR)")
	f.StringVar(&name, "name", "", "identity: the worker, server or operator name (certificate CN)")
	f.StringVar(&role, "role", "worker", "server, worker or operator")
	f.StringSliceVar(&hosts, "host", nil, "extra DNS names or IPs for the certificate")
	f.DurationVar(&validity, "validity", tlsutil.DefaultValidity, "how long the certificate lives")
	f.BoolVar(&force, "force", false, "replace an existing key and certificate")
	cmd.MarkFlagRequired("name")
	return cmd
}

func tlsRenewCmd() *cobra.Command {
	var caDir, certPath, out string
	var validity time.Duration
	cmd := &cobra.Command{
		Use:   "renew --cert FILE",
		Short: "On the CA host: re-sign a certificate it issued for the same key and identity (the key does not move)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			old, err := os.ReadFile(certPath)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			cert, serial, err := tlsutil.Renew(caDir, old, validity)
			if err != nil {
				return withCode(ExitFailed, err)
			}
			if out == "" {
				out = certPath
			}
			if err := tlsutil.WriteFileAtomic(out, cert, 0o644, true); err != nil {
				return withCode(ExitFailed, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "renewed %s, serial %s (revoke the old serial if the old certificate must stop working before it expires)\n", out, serial)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&caDir, "ca-dir", defaultCADir, "the CA's folder")
	f.StringVar(&certPath, "cert", "", "the current certificate")
	f.StringVar(&out, "out", "", "where to write the new certificate (default: replace --cert)")
	f.DurationVar(&validity, "validity", tlsutil.DefaultValidity, "how long the new certificate lives")
	cmd.MarkFlagRequired("cert")
	return cmd
}

func tlsRevokeCmd() *cobra.Command {
	var reason string
	cmd := &cobra.Command{
		Use:   "revoke SERIAL",
		Short: "Put a certificate serial on the replicated deny list every server checks on every connection (operators)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			serial, err := fsm.NormalizeSerial(args[0])
			if err != nil {
				return withCode(ExitUsage, err)
			}
			c, err := newAPIClient()
			if err != nil {
				return err
			}
			if err := c.RevokeCert(cmd.Context(), serial, reason); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "revoked %s: servers refuse it from their next handshake on\n", serial)
			return nil
		},
	}
	addClientFlags(cmd)
	cmd.Flags().StringVar(&reason, "reason", "", "why, kept with the entry")
	return cmd
}

func tlsRevokedCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "revoked",
		Short: "List the revoked certificate serials",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := newAPIClient()
			if err != nil {
				return err
			}
			list, err := c.RevokedCerts(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(list)
			}
			for _, r := range list {
				fmt.Fprintf(cmd.OutOrStdout(), "%s\t%s\t%s\t%q\n", r.Serial, r.Revoked.UTC().Format(time.RFC3339), r.By, r.Reason)
			}
			return nil
		},
	}
	addClientFlags(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the deny list as JSON")
	return cmd
}
