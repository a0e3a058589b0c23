package server_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server"
	"github.com/ferry-dev/ferry/server/servertest"
)

// TestServerRefusesCAKeyInTLSDir: a server whose --tls-dir holds the CA key
// does not start, and says where the key belongs.
func TestServerRefusesCAKeyInTLSDir(t *testing.T) {
	dir := t.TempDir()
	tlsDir := filepath.Join(dir, "tls")
	if err := server.EnsureCerts(tlsDir, map[string]string{"s1": tlsutil.KindServer}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(tlsDir, tlsutil.CAKeyFile)); err == nil {
		t.Fatal("the development certificates put the CA key in the runtime folder")
	}
	key, err := os.ReadFile(filepath.Join(tlsutil.DevCADir(tlsDir), tlsutil.CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tlsDir, tlsutil.CAKeyFile), key, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := server.StartServer(context.Background(), zerolog.Nop(), server.Config{ID: "s1", DataDir: filepath.Join(dir, "data"),
		Listen: "127.0.0.1:0", RaftAddr: "127.0.0.1:0", Bootstrap: true, TLSDir: tlsDir})
	if err == nil {
		s.Close()
		t.Fatal("server started with the CA key in its --tls-dir")
	}
	if !strings.Contains(err.Error(), "ca-key.pem") || !strings.Contains(err.Error(), "CA host") {
		t.Fatalf("refusal does not say where the key belongs: %v", err)
	}
}

// TestRevokedCertificateRefusedByEveryServer: an operator revokes a worker's
// serial; the deny list replicates and every server refuses that
// certificate's next connection, while other certificates still connect.
func TestRevokedCertificateRefusedByEveryServer(t *testing.T) {
	c := servertest.New(t, 3, servertest.Options{})
	ctx := context.Background()
	op := c.Client("operator", tlsutil.KindOperator)
	w1 := c.Client("w1", tlsutil.KindWorker)
	c.Client("w2", tlsutil.KindWorker)
	if _, err := w1.Status(ctx); err != nil {
		t.Fatalf("w1 before revocation: %v", err)
	}
	cf, _ := tlsutil.Files(c.TLSDir, "w1")
	pemBytes, err := os.ReadFile(cf)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tlsutil.ParseCertPEM(pemBytes)
	if err != nil {
		t.Fatal(err)
	}
	serial := tlsutil.SerialString(cert.SerialNumber)

	// w1 keeps a connection open across the revocation, as an agent's
	// blocking queries do.
	w1.RetryFor = time.Second

	// Only operators revoke.
	var ref *fsm.Refusal
	if err := w1.RevokeCert(ctx, serial, "self"); !errors.As(err, &ref) || ref.Kind != fsm.RefuseForbidden {
		t.Fatalf("worker revoked a certificate: %v", err)
	}
	if _, err := w1.RevokedCerts(ctx); !errors.As(err, &ref) || ref.Kind != fsm.RefuseForbidden {
		t.Fatalf("worker listed the deny list: %v", err)
	}
	if err := op.RevokeCert(ctx, "not-hex", ""); !errors.As(err, &ref) || ref.Kind != fsm.RefuseInvalid {
		t.Fatalf("bad serial: %v", err)
	}
	if err := op.RevokeCert(ctx, serial, "host lost"); err != nil {
		t.Fatal(err)
	}
	list, err := op.RevokedCerts(ctx)
	if err != nil || len(list) != 1 || list[0].Serial != serial || list[0].By.Name != "operator" {
		t.Fatalf("deny list %+v %v", list, err)
	}

	deadline := time.Now().Add(10 * time.Second)
	for i, s := range c.Servers {
		for !s.Store().Revoked(serial) {
			if time.Now().After(deadline) {
				t.Fatalf("server %d never learned the revocation", i)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if _, err := w1.Status(ctx); err == nil {
		t.Fatal("a connection opened before the revocation still serves the revoked certificate")
	}
	for i, addr := range c.Addrs() {
		for _, tc := range []struct {
			name   string
			refuse bool
		}{{"w1", true}, {"w2", false}} {
			conf, err := tlsutil.ClientConfig(c.TLSDir, tc.name)
			if err != nil {
				t.Fatal(err)
			}
			cl, err := api.NewClient([]string{addr}, conf) // a fresh connection to this server only
			if err != nil {
				t.Fatal(err)
			}
			cl.RetryFor = 500 * time.Millisecond
			_, err = cl.Status(ctx)
			cl.Close()
			if tc.refuse && err == nil {
				t.Errorf("server %d accepted the revoked certificate", i)
			}
			if !tc.refuse && err != nil {
				t.Errorf("server %d refused %s: %v", i, tc.name, err)
			}
		}
	}
}

// TestWorkersReadRevokedSerials: a worker reads the revoked serials (its
// export gate needs them), nothing more: who revoked and why stay hidden.
func TestWorkersReadRevokedSerials(t *testing.T) {
	c := servertest.New(t, 1, servertest.Options{})
	ctx := context.Background()
	op := c.Client("operator", tlsutil.KindOperator)
	w1 := c.Client("w1", tlsutil.KindWorker)
	if got, err := w1.RevokedSerials(ctx); err != nil || len(got) != 0 {
		t.Fatalf("empty deny list: %v %v", got, err)
	}
	for _, sn := range []string{"0B", "a1"} {
		if err := op.RevokeCert(ctx, sn, "secret reason"); err != nil {
			t.Fatal(err)
		}
	}
	got, err := w1.RevokedSerials(ctx)
	if err != nil {
		t.Fatalf("a worker could not read the revoked serials: %v", err)
	}
	if len(got) != 2 || got[0] != "a1" || got[1] != "b" {
		t.Fatalf("revoked serials %q, want [a1 b] (canonical hex, sorted)", got)
	}
	var ref *fsm.Refusal
	if _, err := w1.RevokedCerts(ctx); !errors.As(err, &ref) || ref.Kind != fsm.RefuseForbidden {
		t.Fatalf("a worker read the full deny list: %v", err)
	}
}
