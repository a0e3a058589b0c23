package tlsutil

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func readCert(t *testing.T, dir, name string) (certPEM []byte, serial string) {
	t.Helper()
	cf, _ := Files(dir, name)
	b, err := os.ReadFile(cf)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseCertPEM(b)
	if err != nil {
		t.Fatal(err)
	}
	return b, SerialString(c.SerialNumber)
}

// TestRuntimeDirRefusesCAKey: a process's --tls-dir holding the CA key is
// refused, with a message saying where the key belongs.
func TestRuntimeDirRefusesCAKey(t *testing.T) {
	dir := t.TempDir()
	if err := EnsureDev(dir, Cert{Name: "s1", Kind: KindServer}); err != nil {
		t.Fatal(err)
	}
	if _, err := ServerConfig(dir, "s1"); err != nil {
		t.Fatalf("clean runtime dir refused: %v", err)
	}
	key, err := os.ReadFile(filepath.Join(DevCADir(dir), CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, CAKeyFile), key, 0o600); err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]func() error{
		"server": func() error { _, err := ServerConfig(dir, "s1"); return err },
		"client": func() error { _, err := ClientConfig(dir, "s1"); return err },
	} {
		err := f()
		if err == nil || !strings.Contains(err.Error(), "must not be in a runtime --tls-dir") || !strings.Contains(err.Error(), "ferry tls init") {
			t.Errorf("%s config with the CA key in --tls-dir: %v", name, err)
		}
	}
}

// TestCSRAndSign: the key is made where it is used, the CA host signs only
// the identity and hosts its operator approved, and nothing but the CA's
// own files lives in the CA folder.
func TestCSRAndSign(t *testing.T) {
	ca, host := t.TempDir(), t.TempDir()
	if err := InitCA(ca); err != nil {
		t.Fatal(err)
	}
	csrPath, err := NewCSR(host, "worker-a", KindWorker, []string{"10.0.0.7"}, false)
	if err != nil {
		t.Fatal(err)
	}
	_, kf := Files(host, "worker-a")
	if fi, err := os.Stat(kf); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key %s: %v %v", kf, fi, err)
	}
	csr, err := os.ReadFile(csrPath)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(csr), "PRIVATE KEY") {
		t.Fatal("the CSR carries the private key")
	}
	for name, req := range map[string]SignRequest{
		"other name":     {Name: "worker-b", Kind: KindWorker, Hosts: []string{"10.0.0.7"}},
		"other role":     {Name: "worker-a", Kind: KindOperator, Hosts: []string{"10.0.0.7"}},
		"host not given": {Name: "worker-a", Kind: KindWorker},
	} {
		if _, _, err := Sign(ca, csr, req); err == nil {
			t.Errorf("%s: signed", name)
		}
	}
	if _, _, err := Sign(ca, []byte("garbage"), SignRequest{Name: "worker-a", Kind: KindWorker}); err == nil {
		t.Error("garbage CSR signed")
	}
	cert, sn, err := Sign(ca, csr, SignRequest{Name: "worker-a", Kind: KindWorker, Hosts: []string{"10.0.0.7"}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseCertPEM(cert)
	if err != nil {
		t.Fatal(err)
	}
	if SerialString(c.SerialNumber) != sn {
		t.Fatalf("serial %s, certificate says %s", sn, SerialString(c.SerialNumber))
	}
	if life := time.Until(c.NotAfter); life < DefaultValidity-time.Hour || life > DefaultValidity+time.Hour {
		t.Fatalf("leaf lives %s, want the 30-day default", life)
	}
	if id, err := IdentityOf(c); err != nil || id != (Identity{Name: "worker-a", Kind: KindWorker}) {
		t.Fatalf("identity %+v %v", id, err)
	}
	// Installing needs the CA certificate in the host's folder.
	if err := InstallCert(host, "worker-a", cert, false); err == nil {
		t.Fatal("installed without ca.pem to check the chain")
	}
	if err := copyCACert(ca, host); err != nil {
		t.Fatal(err)
	}
	if err := InstallCert(host, "worker-a", cert, false); err != nil {
		t.Fatal(err)
	}
	if _, err := ClientConfig(host, "worker-a"); err != nil {
		t.Fatalf("installed certificate unusable: %v", err)
	}
	ents, _ := os.ReadDir(ca)
	for _, e := range ents {
		if n := e.Name(); n != "ca.pem" && n != CAKeyFile {
			t.Errorf("CA folder holds %s", n)
		}
	}
	// A certificate for another key is not installed over this one.
	other := t.TempDir()
	otherCSR, err := NewCSR(other, "worker-a", KindWorker, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	ob, _ := os.ReadFile(otherCSR)
	oc, _, err := Sign(ca, ob, SignRequest{Name: "worker-a", Kind: KindWorker})
	if err != nil {
		t.Fatal(err)
	}
	if err := InstallCert(host, "worker-a", oc, true); err == nil || !strings.Contains(err.Error(), "does not match the key") {
		t.Fatalf("certificate for another key installed: %v", err)
	}
}

// TestSignRefusesHandMadeCSRs: a host editing its CSR gets no CA
// certificate, no weak key and no extra names.
func TestSignRefusesHandMadeCSRs(t *testing.T) {
	ca := t.TempDir()
	if err := InitCA(ca); err != nil {
		t.Fatal(err)
	}
	mk := func(key any, tmpl *x509.CertificateRequest) []byte {
		der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	}
	subj := pkix.Name{CommonName: "w1", OrganizationalUnit: []string{KindWorker}}
	req := SignRequest{Name: "w1", Kind: KindWorker}
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for name, csr := range map[string][]byte{
		"P-224 key":   mk(p224, &x509.CertificateRequest{Subject: subj}),
		"RSA key":     mk(rsaKey, &x509.CertificateRequest{Subject: subj}),
		"two roles":   mk(p256, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "w1", OrganizationalUnit: []string{KindWorker, KindOperator}}}),
		"extra email": mk(p256, &x509.CertificateRequest{Subject: subj, EmailAddresses: []string{"a@b"}}),
		"extra DNS":   mk(p256, &x509.CertificateRequest{Subject: subj, DNSNames: []string{"server.example"}}),
	} {
		if _, _, err := Sign(ca, csr, req); err == nil {
			t.Errorf("%s: signed", name)
		}
	}
	// A CSR asking for CA powers through an extension gets a plain leaf.
	bc, _ := asn1Marshal(true)
	csr := mk(p256, &x509.CertificateRequest{Subject: subj, ExtraExtensions: []pkix.Extension{{Id: []int{2, 5, 29, 19}, Critical: true, Value: bc}}})
	cert, _, err := Sign(ca, csr, req)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := ParseCertPEM(cert)
	if c.IsCA || c.KeyUsage&x509.KeyUsageCertSign != 0 {
		t.Fatal("a CSR obtained a CA certificate")
	}
}

// TestReissueNeedsForceAndTightensMode: re-issuing refuses without force,
// and with it writes a new 0600 key even over an old 0644 one.
func TestReissueNeedsForceAndTightensMode(t *testing.T) {
	ca, dir := t.TempDir(), t.TempDir()
	if err := InitCA(ca); err != nil {
		t.Fatal(err)
	}
	if _, err := Issue(ca, dir, "w1", KindWorker, nil, IssueOptions{}); err != nil {
		t.Fatal(err)
	}
	_, kf := Files(dir, "w1")
	oldKey, _ := os.ReadFile(kf)
	if err := os.Chmod(kf, 0o644); err != nil { // as an older release left it
		t.Fatal(err)
	}
	if _, err := Issue(ca, dir, "w1", KindWorker, nil, IssueOptions{}); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("re-issue without force: %v", err)
	}
	if _, err := NewCSR(dir, "w1", KindWorker, nil, false); err == nil {
		t.Fatal("NewCSR replaced a key without force")
	}
	if now, _ := os.ReadFile(kf); string(now) != string(oldKey) {
		t.Fatal("a refused re-issue changed the key")
	}
	if _, err := Issue(ca, dir, "w1", KindWorker, nil, IssueOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(kf)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("re-issued key mode %v %v", fi.Mode(), err)
	}
	if now, _ := os.ReadFile(kf); string(now) == string(oldKey) {
		t.Fatal("forced re-issue kept the old key")
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temporary file %s left behind", e.Name())
		}
	}
	if _, err := Issue(dir, dir, "w2", KindWorker, nil, IssueOptions{}); err == nil {
		t.Fatal("issued with the CA folder as the runtime folder")
	}
}

func TestRenew(t *testing.T) {
	dir := t.TempDir()
	if err := EnsureDev(dir, Cert{Name: "w1", Kind: KindWorker, Hosts: []string{"10.1.2.3", "w1.example"}}); err != nil {
		t.Fatal(err)
	}
	oldPEM, oldSN := readCert(t, dir, "w1")
	old, _ := ParseCertPEM(oldPEM)
	newPEM, sn, err := Renew(DevCADir(dir), oldPEM, 10*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if sn == oldSN {
		t.Fatal("renewal kept the serial")
	}
	c, _ := ParseCertPEM(newPEM)
	if !c.PublicKey.(*ecdsa.PublicKey).Equal(old.PublicKey) {
		t.Fatal("renewal changed the key")
	}
	if c.Subject.CommonName != "w1" || c.Subject.OrganizationalUnit[0] != KindWorker || len(c.IPAddresses) != len(old.IPAddresses) || len(c.DNSNames) != len(old.DNSNames) {
		t.Fatalf("renewal changed the identity: %v %v %v", c.Subject, c.IPAddresses, c.DNSNames)
	}
	if life := time.Until(c.NotAfter); life > 10*24*time.Hour+time.Hour || life < 10*24*time.Hour-time.Hour {
		t.Fatalf("renewed for %s", life)
	}
	if err := InstallCert(dir, "w1", newPEM, true); err != nil {
		t.Fatal(err)
	}
	if _, got := readCert(t, dir, "w1"); got != sn {
		t.Fatal("renewed certificate not installed")
	}
	// Another CA does not renew this one's certificates.
	otherCA := t.TempDir()
	if err := InitCA(otherCA); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Renew(otherCA, newPEM, 0); err == nil {
		t.Fatal("renewed by another CA")
	}
}

// TestEnsureDevMovesCAKeyOut: a development folder made before the CA key
// was kept apart still works, with the key moved next to it.
func TestEnsureDevMovesCAKeyOut(t *testing.T) {
	dir := t.TempDir()
	if err := InitCA(dir); err != nil { // the old layout: CA in the runtime folder
		t.Fatal(err)
	}
	if err := EnsureDev(dir, Cert{Name: "server", Kind: KindServer}); err != nil {
		t.Fatal(err)
	}
	if err := CheckRuntimeDir(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(DevCADir(dir), CAKeyFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := ServerConfig(dir, "server"); err != nil {
		t.Fatal(err)
	}
}

// TestEnsureDevRenewsNearExpiry: a development cluster keeps working past
// its leaves' 30 days.
func TestEnsureDevRenewsNearExpiry(t *testing.T) {
	dir := t.TempDir()
	if err := EnsureDev(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := Issue(DevCADir(dir), dir, "w1", KindWorker, nil, IssueOptions{Validity: 2 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	_, before := readCert(t, dir, "w1")
	if err := EnsureDev(dir, Cert{Name: "w1", Kind: KindWorker}); err != nil {
		t.Fatal(err)
	}
	b, after := readCert(t, dir, "w1")
	c, _ := ParseCertPEM(b)
	if after == before || time.Until(c.NotAfter) < DefaultValidity-time.Hour {
		t.Fatalf("near-expiry certificate not renewed: serial %s -> %s, expires %s", before, after, c.NotAfter)
	}
	if err := EnsureDev(dir, Cert{Name: "w1", Kind: KindWorker}); err != nil {
		t.Fatal(err)
	}
	if _, again := readCert(t, dir, "w1"); again != after {
		t.Fatal("a fresh certificate was renewed again")
	}
}

// TestDenyListOnEveryConnection: once a serial is revoked, new and resumed
// connections with it are refused; other certificates still connect.
func TestDenyListOnEveryConnection(t *testing.T) {
	dir := t.TempDir()
	if err := EnsureDev(dir, Cert{Name: "s1", Kind: KindServer}, Cert{Name: "w1", Kind: KindWorker}, Cert{Name: "w2", Kind: KindWorker}); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	denied := map[string]bool{}
	sc, err := ServerConfig(dir, "s1")
	if err != nil {
		t.Fatal(err)
	}
	sc = WithDenyList(sc, func(s string) bool { mu.Lock(); defer mu.Unlock(); return denied[s] })
	ln, err := tls.Listen("tcp", "127.0.0.1:0", sc)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go serveOK(ln)
	caches := map[string]tls.ClientSessionCache{} // one per identity, as each process has its own
	dial := func(name string) (resumed bool, err error) {
		cc, err := ClientConfig(dir, name)
		if err != nil {
			t.Fatal(err)
		}
		if caches[name] == nil {
			caches[name] = tls.NewLRUClientSessionCache(4)
		}
		cc.ClientSessionCache = caches[name]
		c, err := tls.Dial("tcp", ln.Addr().String(), cc)
		if err != nil {
			return false, err
		}
		defer c.Close()
		b, err := io.ReadAll(c)
		if err == nil && string(b) != "ok" {
			err = io.ErrUnexpectedEOF
		}
		return c.ConnectionState().DidResume, err
	}
	sawResume := false
	for i := 0; i < 3; i++ { // the later dials resume the first session
		resumed, err := dial("w1")
		if err != nil {
			t.Fatalf("w1 before revocation: %v", err)
		}
		sawResume = sawResume || resumed
	}
	if !sawResume {
		t.Log("no session was resumed: only full handshakes were checked")
	}
	_, sn := readCert(t, dir, "w1")
	mu.Lock()
	denied[sn] = true
	mu.Unlock()
	for i := 0; i < 3; i++ {
		resumed, err := dial("w1")
		if err == nil {
			t.Fatalf("revoked certificate connected (resumed %v)", resumed)
		}
	}
	if _, err := dial("w2"); err != nil {
		t.Fatalf("another worker refused: %v", err)
	}
}

func TestWriteFileAtomic(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := WriteFileAtomic(p, []byte("one"), 0o600, false); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(p, []byte("two"), 0o600, false); err == nil {
		t.Fatal("replaced without force")
	}
	os.Chmod(p, 0o666)
	if err := WriteFileAtomic(p, []byte("two"), 0o600, true); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	fi, _ := os.Stat(p)
	if string(b) != "two" || fi.Mode().Perm() != 0o600 {
		t.Fatalf("content %q mode %v", b, fi.Mode())
	}
}

// asn1Marshal encodes BasicConstraints{cA} as a CSR extension value.
func asn1Marshal(isCA bool) ([]byte, error) {
	return asn1.Marshal(struct {
		IsCA bool `asn1:"optional"`
	}{isCA})
}

// TestDenyListOnClients: a client whose config carries the deny list
// refuses a server presenting a revoked certificate (raft and forwarding
// between servers, agents to servers); other servers still connect.
func TestDenyListOnClients(t *testing.T) {
	dir := t.TempDir()
	if err := EnsureDev(dir, Cert{Name: "s1", Kind: KindServer}, Cert{Name: "s2", Kind: KindServer}, Cert{Name: "w1", Kind: KindWorker}); err != nil {
		t.Fatal(err)
	}
	serve := func(name string) (addr, serial string) {
		sc, err := ServerConfig(dir, name)
		if err != nil {
			t.Fatal(err)
		}
		leaf, err := x509.ParseCertificate(sc.Certificates[0].Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		ln, err := tls.Listen("tcp", "127.0.0.1:0", sc)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go serveOK(ln)
		return ln.Addr().String(), SerialString(leaf.SerialNumber)
	}
	revokedAddr, revokedSerial := serve("s1")
	goodAddr, _ := serve("s2")
	cc, err := ClientConfig(dir, "w1")
	if err != nil {
		t.Fatal(err)
	}
	cc = WithDenyList(cc, func(s string) bool { return s == revokedSerial })
	dial := func(addr string) error {
		c, err := tls.Dial("tcp", addr, cc)
		if err != nil {
			return err
		}
		defer c.Close()
		b, err := io.ReadAll(c)
		if err == nil && string(b) != "ok" {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	if err := dial(revokedAddr); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("a server with a revoked certificate was accepted: %v", err)
	}
	if err := dial(goodAddr); err != nil {
		t.Fatalf("a server in good standing: %v", err)
	}
}

// serveOK answers "ok" on every connection of ln whose TLS handshake
// succeeds, until ln is closed.
func serveOK(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			if c.(*tls.Conn).Handshake() == nil {
				io.WriteString(c, "ok")
			}
		}()
	}
}
