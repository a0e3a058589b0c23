// Package tlsutil makes ferry's CA and certificates and builds the mTLS
// configurations every process uses. A certificate's Common Name is its
// holder's name (a worker, server or operator) and its Organizational Unit
// is its kind; the server derives identity from them, never from a request
// body.
//
// Lifecycle: the CA lives in its own folder on the CA host (InitCA); a host
// makes its key where it is used and sends only a CSR (NewCSR); the CA host
// signs it after checking the requested identity (Sign) or re-signs a
// certificate for the same key (Renew); the host installs the certificate
// (InstallCert). Runtime folders (a process's --tls-dir) hold the CA
// certificate, the process's own key and certificate, never the CA key
// (CheckRuntimeDir). Leaves live 30 days by default. EnsureDev does all of it
// in one process for development, with the CA in DevCADir.
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

	// DefaultValidity is how long a leaf certificate lives unless asked
	// otherwise: short enough that a lost key expires on its own soon,
	// with `ferry tls renew` before then.
	DefaultValidity = 30 * 24 * time.Hour
	// MaxValidity caps a requested validity.
	MaxValidity = 397 * 24 * time.Hour
)

// CAKeyFile is the CA private key's file name; a runtime folder holding it
// is refused.
const CAKeyFile = caKey

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
	if err := writeKey(filepath.Join(dir, caKey), key, false); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, caCert), "CERTIFICATE", der, 0o644, false)
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
	if err := CheckRuntimeDir(dir); err != nil {
		return tls.Certificate{}, nil, err
	}
	cf, kf := Files(dir, name)
	cert, err := tls.LoadX509KeyPair(cf, kf)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("loading certificate %s: %w (make the key and a CSR with `ferry tls csr --dir %s --name %s`, sign it on the CA host with `ferry tls sign`)", cf, err, dir, name)
	}
	b, err := os.ReadFile(filepath.Join(dir, caCert))
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("reading CA certificate: %w (copy ca.pem from the CA host into %s)", err, dir)
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

func writeKey(path string, k *ecdsa.PrivateKey, force bool) error {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return fmt.Errorf("encoding key: %w", err)
	}
	return writePEM(path, "EC PRIVATE KEY", der, 0o600, force)
}

func writePEM(path, typ string, der []byte, mode os.FileMode, force bool) error {
	return WriteFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode, force)
}

// WriteFileAtomic writes data to path through a temporary file in the same
// folder (created with mode, fsynced, renamed over path, folder fsynced), so
// a crash leaves the old file or the new one, and a replaced file never
// keeps an older, wider mode. Without force an existing path is an error.
func WriteFileAtomic(path string, data []byte, mode os.FileMode, force bool) error {
	if !force {
		if _, err := os.Lstat(path); err == nil {
			return fmt.Errorf("%s already exists: pass --force to replace it", path)
		}
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(mode); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("writing %s: fsync: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	ok = true
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
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
