package iscsi

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"testing"
	"time"
)

type testPKI struct {
	caPEM                 []byte
	pool                  *x509.CertPool
	serverCert, serverKey []byte
	client                tls.Certificate
}

func newTestPKI(t *testing.T) testPKI {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ferry test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	leaf := func(serial int64, usage x509.ExtKeyUsage) ([]byte, []byte) {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "ferry worker"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kd, _ := x509.MarshalPKCS8PrivateKey(k)
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd})
	}
	p := testPKI{caPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), pool: x509.NewCertPool()}
	p.pool.AddCert(ca)
	p.serverCert, p.serverKey = leaf(2, x509.ExtKeyUsageServerAuth)
	cc, ck := leaf(3, x509.ExtKeyUsageClientAuth)
	if p.client, err = tls.X509KeyPair(cc, ck); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestExportOverMutualTLS(t *testing.T) {
	pki := newTestPKI(t)
	image, want := randomImage(t, 2<<20)
	e, _ := startTestExport(t, image, func(c *ExportConfig) {
		c.TLS = &GateTLS{CertPEM: pki.serverCert, KeyPEM: pki.serverKey, ClientCAPEM: pki.caPEM}
	})
	ctx := context.Background()
	cfg := InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: 3 * time.Second,
		TLS: &tls.Config{RootCAs: pki.pool, Certificates: []tls.Certificate{pki.client}, MinVersion: tls.VersionTLS13}}
	l, err := Dial(ctx, testLogger(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make([]byte, len(want))
	if _, err := l.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("content differs over TLS")
	}

	noCert := cfg
	noCert.TLS = &tls.Config{RootCAs: pki.pool, MinVersion: tls.VersionTLS13}
	if l2, err := Dial(ctx, testLogger(t), noCert); err == nil {
		l2.Close()
		t.Fatal("initiator without a client certificate got in")
	}
	plain := cfg
	plain.TLS = nil
	if l3, err := Dial(ctx, testLogger(t), plain); err == nil {
		l3.Close()
		t.Fatal("plain-text initiator got through a TLS gate")
	}
}
