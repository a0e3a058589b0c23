package tlsutil

import (
	"os"
	"testing"

	"crypto/x509"
)

// FuzzSign: whatever a host sends as its CSR, Sign either refuses it or
// returns a leaf for exactly the approved name and role, never a CA.
func FuzzSign(f *testing.F) {
	ca, host := f.TempDir(), f.TempDir()
	if err := InitCA(ca); err != nil {
		f.Fatal(err)
	}
	if p, err := NewCSR(host, "w1", KindWorker, []string{"10.0.0.1"}, false); err == nil {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"))
	req := SignRequest{Name: "w1", Kind: KindWorker, Hosts: []string{"10.0.0.1"}}
	f.Fuzz(func(t *testing.T, csr []byte) {
		cert, _, err := Sign(ca, csr, req)
		if err != nil {
			return
		}
		c, err := ParseCertPEM(cert)
		if err != nil {
			t.Fatalf("Sign returned an unparsable certificate: %v", err)
		}
		id, err := IdentityOf(c)
		if err != nil || id.Name != "w1" || id.Kind != KindWorker || c.IsCA || c.KeyUsage&x509.KeyUsageCertSign != 0 {
			t.Fatalf("signed %+v (CA %v) from a fuzzed CSR: %v", id, c.IsCA, err)
		}
	})
}
