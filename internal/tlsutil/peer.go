package tlsutil

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// PeerIs returns a VerifyConnection check that the peer's first
// certificate names exactly want (name and kind). It runs after the chain
// was verified against the CA (ClientCAs on a server, see
// PeerClientConfig on a client), so a certificate of the same CA for
// another holder is refused.
func PeerIs(want Identity) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("peer sent no certificate")
		}
		id, err := IdentityOf(cs.PeerCertificates[0])
		if err != nil {
			return err
		}
		if id != want {
			return fmt.Errorf("peer presents the certificate of %s %q, only %s %q is admitted here", id.Kind, id.Name, want.Kind, want.Name)
		}
		return nil
	}
}

// PeerClientConfig is the TLS config of a client presenting name's
// certificate from dir and accepting only a server whose certificate, signed
// by dir's CA, names peer. Host names are not checked: the peer is known by
// its certificate, whatever address reaches it.
func PeerClientConfig(dir, name string, peer Identity) (*tls.Config, error) {
	if !nameRE.MatchString(peer.Name) {
		return nil, fmt.Errorf("peer name %q is not a valid certificate name", peer.Name)
	}
	cert, pool, err := load(dir, name)
	if err != nil {
		return nil, err
	}
	is := PeerIs(peer)
	return &tls.Config{
		Certificates:       []tls.Certificate{cert},
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // replaced by VerifyConnection: chain to our CA, then the exact peer
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("peer sent no certificate")
			}
			opts := x509.VerifyOptions{Roots: pool, Intermediates: x509.NewCertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
			for _, c := range cs.PeerCertificates[1:] {
				opts.Intermediates.AddCert(c)
			}
			if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
				return fmt.Errorf("peer certificate: %w", err)
			}
			return is(cs)
		},
	}, nil
}

// KeyPairPEM reads name's certificate and key and the CA certificate from
// dir as PEM, for a child process that gets them on its standard input.
func KeyPairPEM(dir, name string) (certPEM, keyPEM, caPEM []byte, err error) {
	if err := CheckRuntimeDir(dir); err != nil {
		return nil, nil, nil, err
	}
	cf, kf := Files(dir, name)
	if certPEM, err = os.ReadFile(cf); err != nil {
		return nil, nil, nil, fmt.Errorf("reading certificate: %w (make one with `ferry tls csr` and `ferry tls sign`)", err)
	}
	if keyPEM, err = os.ReadFile(kf); err != nil {
		return nil, nil, nil, fmt.Errorf("reading key: %w", err)
	}
	if caPEM, err = os.ReadFile(filepath.Join(dir, caCert)); err != nil {
		return nil, nil, nil, fmt.Errorf("reading CA certificate: %w (copy ca.pem from the CA host into %s)", err, dir)
	}
	if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
		return nil, nil, nil, fmt.Errorf("certificate %s: %w", cf, err)
	}
	return certPEM, keyPEM, caPEM, nil
}
