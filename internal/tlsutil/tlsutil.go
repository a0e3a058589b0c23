// Package tlsutil makes ferry's development CA and certificates and builds
// the mTLS configurations every process uses. A certificate's Common Name is
// its holder's name (a worker, server or operator) and its Organizational
// Unit is its kind; the server derives identity from them, never from a
// request body.
package tlsutil

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// Kinds of certificate holders (the OU of the subject).
const (
	KindServer   = "server"
	KindWorker   = "worker"
	KindOperator = "operator"
)

const (
	caCert = "ca.pem"
	caKey  = "ca-key.pem"
)

var nameRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$`)

// Identity is who a certificate names.
type Identity struct {
	Name string
	Kind string
}

// InitCA creates a new CA in dir (ca.pem, ca-key.pem). It refuses to
// overwrite an existing CA.
func InitCA(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	if _, err := os.Stat(filepath.Join(dir, caCert)); err == nil {
		return fmt.Errorf("%s already holds a CA: use another --dir or remove it", dir)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating CA key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "ferry development CA", Organization: []string{"ferry"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("signing CA: %w", err)
	}
	if err := writeKey(filepath.Join(dir, caKey), key); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, caCert), "CERTIFICATE", der, 0o644)
}

// Issue signs a certificate for name with kind (server, worker, operator),
// valid for the given extra hosts (DNS names or IPs) besides localhost, and
// writes <name>.pem and <name>-key.pem into dir.
func Issue(dir, name, kind string, hosts []string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("certificate name %q: use letters, digits, '.', '_' or '-' (max 63)", name)
	}
	if kind != KindServer && kind != KindWorker && kind != KindOperator {
		return fmt.Errorf("certificate role %q: use server, worker or operator", kind)
	}
	ca, caK, err := loadCA(dir)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generating key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: name, OrganizationalUnit: []string{kind}, Organization: []string{"ferry"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(2 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     []string{name, "localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caK)
	if err != nil {
		return fmt.Errorf("signing certificate for %s: %w", name, err)
	}
	if err := writeKey(filepath.Join(dir, name+"-key.pem"), key); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, name+".pem"), "CERTIFICATE", der, 0o644)
}

// IdentityOf reads the holder's name and kind from a verified certificate.
func IdentityOf(c *x509.Certificate) (Identity, error) {
	if c == nil {
		return Identity{}, errors.New("no client certificate")
	}
	if len(c.Subject.OrganizationalUnit) != 1 {
		return Identity{}, fmt.Errorf("certificate %q has no single role (OU)", c.Subject.CommonName)
	}
	id := Identity{Name: c.Subject.CommonName, Kind: c.Subject.OrganizationalUnit[0]}
	if !nameRE.MatchString(id.Name) {
		return Identity{}, fmt.Errorf("certificate name %q is not valid", id.Name)
	}
	switch id.Kind {
	case KindServer, KindWorker, KindOperator:
		return id, nil
	}
	return Identity{}, fmt.Errorf("certificate %q has unknown role %q", id.Name, id.Kind)
}

// Files returns the paths of name's certificate and key in dir.
func Files(dir, name string) (cert, key string) {
	return filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
}

// ServerConfig is the TLS config of a listener that requires a client
// certificate signed by dir's CA.
func ServerConfig(dir, name string) (*tls.Config, error) {
	cert, pool, err := load(dir, name)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS13,
	}, nil
}

// ClientConfig is the TLS config of a client presenting name's certificate
// and accepting only servers whose certificate (signed by dir's CA) has the
// server role. Host names are not checked: servers are identified by their
// certificate's role, so a cluster can be reached by any address.
func ClientConfig(dir, name string) (*tls.Config, error) {
	cert, pool, err := load(dir, name)
	if err != nil {
		return nil, err
	}
	return clientConfig(cert, pool), nil
}

func clientConfig(cert tls.Certificate, pool *x509.CertPool) *tls.Config {
	return &tls.Config{
		Certificates:       []tls.Certificate{cert},
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // replaced by VerifyConnection below: chain to our CA + server role
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("server sent no certificate")
			}
			opts := x509.VerifyOptions{Roots: pool, Intermediates: x509.NewCertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
			for _, c := range cs.PeerCertificates[1:] {
				opts.Intermediates.AddCert(c)
			}
			if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
				return fmt.Errorf("server certificate: %w", err)
			}
			id, err := IdentityOf(cs.PeerCertificates[0])
			if err != nil {
				return err
			}
			if id.Kind != KindServer {
				return fmt.Errorf("peer %q presents a %s certificate, not a server certificate", id.Name, id.Kind)
			}
			return nil
		},
	}
}

func load(dir, name string) (tls.Certificate, *x509.CertPool, error) {
	cf, kf := Files(dir, name)
	cert, err := tls.LoadX509KeyPair(cf, kf)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("loading certificate %s: %w (make one with `ferry tls issue --dir %s --name %s`)", cf, err, dir, name)
	}
	b, err := os.ReadFile(filepath.Join(dir, caCert))
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("reading CA: %w (make one with `ferry tls init --dir %s`)", err, dir)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return tls.Certificate{}, nil, fmt.Errorf("%s holds no certificate", filepath.Join(dir, caCert))
	}
	return cert, pool, nil
}

func loadCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cb, err := os.ReadFile(filepath.Join(dir, caCert))
	if err != nil {
		return nil, nil, fmt.Errorf("reading CA: %w (make one with `ferry tls init --dir %s`)", err, dir)
	}
	kb, err := os.ReadFile(filepath.Join(dir, caKey))
	if err != nil {
		return nil, nil, fmt.Errorf("reading CA key: %w", err)
	}
	cp, _ := pem.Decode(cb)
	kp, _ := pem.Decode(kb)
	if cp == nil || kp == nil {
		return nil, nil, fmt.Errorf("CA files in %s are not PEM", dir)
	}
	c, err := x509.ParseCertificate(cp.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("parsing CA certificate: %w", err)
	}
	k, err := x509.ParseECPrivateKey(kp.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("parsing CA key: %w", err)
	}
	return c, k, nil
}

func writeKey(path string, k *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return fmt.Errorf("encoding key: %w", err)
	}
	return writePEM(path, "EC PRIVATE KEY", der, 0o600)
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	b := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(path, b, mode); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

// RequireKind returns a copy of a server config that also refuses peers
// whose certificate is not of kind (e.g. only servers may speak raft).
func RequireKind(c *tls.Config, kind string) *tls.Config {
	out := c.Clone()
	prev := c.VerifyConnection
	out.VerifyConnection = func(cs tls.ConnectionState) error {
		if prev != nil {
			if err := prev(cs); err != nil {
				return err
			}
		}
		if len(cs.PeerCertificates) == 0 {
			return errors.New("peer sent no certificate")
		}
		id, err := IdentityOf(cs.PeerCertificates[0])
		if err != nil {
			return err
		}
		if id.Kind != kind {
			return fmt.Errorf("peer %q is a %s, only %s certificates are accepted here", id.Name, id.Kind, kind)
		}
		return nil
	}
	return out
}
