package tlsutil

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// issue is Issue with the default options, failing the test on error.
func issue(caDir, dir, name, kind string, hosts []string) error {
	_, err := Issue(caDir, dir, name, kind, hosts, IssueOptions{})
	return err
}

func TestIssueAndIdentity(t *testing.T) {
	ca, dir := t.TempDir(), t.TempDir()
	if err := InitCA(ca); err != nil {
		t.Fatal(err)
	}
	if err := InitCA(ca); err == nil {
		t.Fatal("second InitCA overwrote the CA")
	}
	for _, c := range []struct{ name, kind string }{{"s1", KindServer}, {"worker-a", KindWorker}, {"op", KindOperator}} {
		if err := issue(ca, dir, c.name, c.kind, []string{"10.0.0.1", "node.example"}); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(filepath.Join(dir, c.name+".pem"))
		p, _ := pem.Decode(b)
		cert, err := x509.ParseCertificate(p.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		id, err := IdentityOf(cert)
		if err != nil || id.Name != c.name || id.Kind != c.kind {
			t.Fatalf("identity %+v %v", id, err)
		}
		if fi, _ := os.Stat(filepath.Join(dir, c.name+"-key.pem")); fi.Mode().Perm() != 0o600 {
			t.Fatalf("key mode %v", fi.Mode())
		}
	}
	if err := issue(ca, dir, "../evil", KindWorker, nil); err == nil {
		t.Fatal("path-like name accepted")
	}
	if err := issue(ca, dir, "x", "admin", nil); err == nil {
		t.Fatal("unknown role accepted")
	}
}

// TestMutualTLS checks a server accepts a client of its CA, a client
// refuses a non-server peer, and a client of another CA is refused.
func TestMutualTLS(t *testing.T) {
	dir, other := t.TempDir(), t.TempDir()
	ca, otherCA := t.TempDir(), t.TempDir()
	for _, d := range []string{ca, otherCA} {
		if err := InitCA(d); err != nil {
			t.Fatal(err)
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(issue(ca, dir, "s1", KindServer, nil))
	must(issue(ca, dir, "w1", KindWorker, nil))
	must(issue(ca, dir, "w2", KindWorker, nil))
	must(issue(otherCA, other, "w1", KindWorker, nil))

	serve := func(cert string, only ...string) (addr string, ids chan Identity) {
		sc, err := ServerConfig(dir, cert)
		must(err)
		if len(only) > 0 {
			sc = RequireKind(sc, only[0])
		}
		ln, err := tls.Listen("tcp", "127.0.0.1:0", sc)
		must(err)
		t.Cleanup(func() { ln.Close() })
		ids = make(chan Identity, 4)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				tc := c.(*tls.Conn)
				if tc.Handshake() == nil {
					id, _ := IdentityOf(tc.ConnectionState().PeerCertificates[0])
					ids <- id
					io.WriteString(tc, "ok")
				}
				tc.Close()
			}
		}()
		return ln.Addr().String(), ids
	}
	dial := func(addr, cadir, name string) error {
		cc, err := ClientConfig(cadir, name)
		must(err)
		c, err := tls.Dial("tcp", addr, cc)
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = io.ReadAll(c)
		return err
	}
	addr, ids := serve("s1")
	if err := dial(addr, dir, "w1"); err != nil {
		t.Fatalf("good client: %v", err)
	}
	if id := <-ids; id.Name != "w1" || id.Kind != KindWorker {
		t.Fatalf("server saw %+v", id)
	}
	// A client whose certificate comes from another CA (while trusting ours) is refused by the server.
	foreign, _, err := load(other, "w1")
	must(err)
	_, pool, err := load(dir, "w1")
	must(err)
	c, err := tls.Dial("tcp", addr, clientConfig(foreign, pool))
	if err == nil {
		_, err = io.ReadAll(c)
		c.Close()
	}
	if err == nil {
		t.Fatal("client certificate of another CA accepted")
	}
	// A listener for servers only (raft) refuses a worker's certificate.
	must(issue(ca, dir, "s2", KindServer, nil))
	raddr, rids := serve("s1", KindServer)
	if err := dial(raddr, dir, "w1"); err == nil {
		t.Fatal("worker certificate accepted by a servers-only listener")
	}
	if err := dial(raddr, dir, "s2"); err != nil {
		t.Fatalf("server on a servers-only listener: %v", err)
	}
	if id := <-rids; id.Name != "s2" {
		t.Fatalf("servers-only listener saw %+v", id)
	}
	// A worker posing as a server is refused by the client.
	waddr, _ := serve("w2")
	if err := dial(waddr, dir, "w1"); err == nil || !strings.Contains(err.Error(), "not a server certificate") {
		t.Fatalf("worker as server: %v", err)
	}
}
