package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/internal/tlsutil"
)

func runCmd(t *testing.T, cmd *cobra.Command, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), err
}

// TestTLSCommandsSplitHosts walks the two-host flow: the key stays in the
// host's folder, the CA host signs only what its flags approve, the host
// installs, and the result is usable; re-running needs --force.
func TestTLSCommandsSplitHosts(t *testing.T) {
	root := t.TempDir()
	ca, host := filepath.Join(root, "ca"), filepath.Join(root, "host-tls")
	if _, err := runCmd(t, tlsInitCmd(), "--dir", ca); err != nil {
		t.Fatal(err)
	}
	if out, err := runCmd(t, tlsCSRCmd(), "--dir", host, "--name", "worker-a", "--role", "worker", "--host", "10.0.1.4"); err != nil {
		t.Fatalf("csr: %v %s", err, out)
	}
	if _, err := runCmd(t, tlsCSRCmd(), "--dir", host, "--name", "worker-a", "--role", "worker"); err == nil {
		t.Fatal("a second csr replaced the key without --force")
	}
	csr := tlsutil.CSRFile(host, "worker-a")
	// The CA host copies the CSR; a worker CSR is not signed as an operator's.
	inbox := filepath.Join(root, "inbox")
	os.MkdirAll(inbox, 0o700)
	b, _ := os.ReadFile(csr)
	os.WriteFile(filepath.Join(inbox, "worker-a.csr"), b, 0o644)
	if _, err := runCmd(t, tlsSignCmd(), "--ca-dir", ca, "--csr", filepath.Join(inbox, "worker-a.csr"), "--name", "worker-a", "--role", "operator", "--host", "10.0.1.4"); err == nil {
		t.Fatal("signed a worker CSR as an operator")
	}
	out, err := runCmd(t, tlsSignCmd(), "--ca-dir", ca, "--csr", filepath.Join(inbox, "worker-a.csr"), "--name", "worker-a", "--role", "worker", "--host", "10.0.1.4")
	if err != nil || !strings.Contains(out, "serial ") {
		t.Fatalf("sign: %v %s", err, out)
	}
	if out, err := runCmd(t, tlsInstallCmd(), "--dir", host, "--name", "worker-a", "--cert", filepath.Join(inbox, "worker-a.pem"), "--ca", filepath.Join(ca, "ca.pem")); err != nil {
		t.Fatalf("install: %v %s", err, out)
	}
	if _, err := tlsutil.ClientConfig(host, "worker-a"); err != nil {
		t.Fatalf("installed certificate unusable: %v", err)
	}
	for _, d := range []string{host, inbox} {
		if _, err := os.Stat(filepath.Join(d, tlsutil.CAKeyFile)); err == nil {
			t.Errorf("%s holds the CA key", d)
		}
	}
	if _, err := os.Stat(filepath.Join(inbox, "worker-a-key.pem")); err == nil {
		t.Error("the private key reached the CA host")
	}
	// Renewal on the CA host keeps the key: the host installs it over the old one.
	if out, err := runCmd(t, tlsRenewCmd(), "--ca-dir", ca, "--cert", filepath.Join(inbox, "worker-a.pem")); err != nil {
		t.Fatalf("renew: %v %s", err, out)
	}
	if _, err := runCmd(t, tlsInstallCmd(), "--dir", host, "--name", "worker-a", "--cert", filepath.Join(inbox, "worker-a.pem")); err == nil {
		t.Fatal("install replaced a certificate without --force")
	}
	if out, err := runCmd(t, tlsInstallCmd(), "--dir", host, "--name", "worker-a", "--cert", filepath.Join(inbox, "worker-a.pem"), "--force"); err != nil {
		t.Fatalf("install renewed: %v %s", err, out)
	}
	// The one-host shortcut refuses the CA folder as the runtime folder.
	if _, err := runCmd(t, tlsIssueCmd(), "--ca-dir", ca, "--dir", ca, "--name", "op", "--role", "operator"); err == nil {
		t.Fatal("issued into the CA folder")
	}
	if out, err := runCmd(t, tlsIssueCmd(), "--ca-dir", ca, "--dir", filepath.Join(root, "op-tls"), "--name", "op", "--role", "operator"); err != nil {
		t.Fatalf("issue: %v %s", err, out)
	}
}
