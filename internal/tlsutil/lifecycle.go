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
	"slices"
	"strings"
	"time"
)

// CheckRuntimeDir refuses a process's --tls-dir that holds the CA key: a
// host holding it could mint any identity, an operator's included.
func CheckRuntimeDir(dir string) error {
	p := filepath.Join(dir, caKey)
	if _, err := os.Lstat(p); err == nil {
		return fmt.Errorf("%s is the CA's private key and must not be in a runtime --tls-dir: move it to the CA host's own folder (e.g. /etc/ferry/ca, made by `ferry tls init --dir /etc/ferry/ca`), keep only ca.pem here, and make certificates with `ferry tls csr` here and `ferry tls sign` there", p)
	}
	return nil
}

// DevCADir is where the development helpers (EnsureDev, `ferry agent
// --dev`, the demo, tests) keep the CA of the runtime folder tlsDir: next
// to it, never inside it.
func DevCADir(tlsDir string) string { return filepath.Clean(tlsDir) + "-ca" }

// CSRFile is the path of name's certificate signing request in dir.
func CSRFile(dir, name string) string { return filepath.Join(dir, name+".csr") }

// checkIdentity validates a requested name and kind.
func checkIdentity(name, kind string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("certificate name %q: use letters, digits, '.', '_' or '-' (max 63)", name)
	}
	if kind != KindServer && kind != KindWorker && kind != KindOperator {
		return fmt.Errorf("certificate role %q: use server, worker or operator", kind)
	}
	return nil
}

// sans are the names a certificate for name is valid for: its name,
// localhost and the loopback addresses, plus hosts (DNS names or IPs).
func sans(name string, hosts []string) ([]string, []net.IP) {
	dns := []string{name, "localhost"}
	ips := []net.IP{net.IPv4(127, 0, 0, 1).To4(), net.IPv6loopback}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			if v4 := ip.To4(); v4 != nil {
				ip = v4
			}
			if !slices.ContainsFunc(ips, ip.Equal) {
				ips = append(ips, ip)
			}
		} else if h != "" && !slices.Contains(dns, h) {
			dns = append(dns, h)
		}
	}
	return dns, ips
}

// NewCSR makes name's private key in dir (<name>-key.pem, mode 0600) and a
// certificate signing request for it (<name>.csr) asking for kind and
// hosts. The key never leaves dir; only the CSR goes to the CA host. An
// existing key is replaced only with force.
func NewCSR(dir, name, kind string, hosts []string, force bool) (string, error) {
	if err := checkIdentity(name, kind); err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("creating %s: %w", dir, err)
	}
	_, kf := Files(dir, name)
	if !force {
		if _, err := os.Lstat(kf); err == nil {
			return "", fmt.Errorf("%s already exists: pass --force to make a new key (its certificate must then be signed again)", kf)
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("generating key: %w", err)
	}
	dns, ips := sans(name, hosts)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:  pkix.Name{CommonName: name, OrganizationalUnit: []string{kind}, Organization: []string{"ferry"}},
		DNSNames: dns, IPAddresses: ips,
	}, key)
	if err != nil {
		return "", fmt.Errorf("making the CSR: %w", err)
	}
	if err := writeKey(kf, key, true); err != nil {
		return "", err
	}
	csr := CSRFile(dir, name)
	if err := writePEM(csr, "CERTIFICATE REQUEST", der, 0o644, true); err != nil {
		return "", err
	}
	return csr, nil
}

// SignRequest is what the CA host's operator approves: the identity the
// CSR must ask for, the extra hosts it may name, and the validity.
type SignRequest struct {
	Name     string
	Kind     string
	Hosts    []string
	Validity time.Duration // 0: DefaultValidity
}

// Sign checks a CSR asks for exactly req's name and role and no host beyond
// req's, then signs it with the CA in caDir. It returns the certificate
// (PEM) and its serial as the deny list writes it.
func Sign(caDir string, csrPEM []byte, req SignRequest) ([]byte, string, error) {
	if err := checkIdentity(req.Name, req.Kind); err != nil {
		return nil, "", err
	}
	b, _ := pem.Decode(csrPEM)
	if b == nil || b.Type != "CERTIFICATE REQUEST" {
		return nil, "", errors.New("not a PEM certificate signing request (make one with `ferry tls csr`)")
	}
	csr, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil {
		return nil, "", fmt.Errorf("parsing the CSR: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, "", fmt.Errorf("the CSR's signature does not verify: %w", err)
	}
	if pk, ok := csr.PublicKey.(*ecdsa.PublicKey); !ok || pk.Curve != elliptic.P256() && pk.Curve != elliptic.P384() {
		return nil, "", fmt.Errorf("the CSR's key is %T; ferry certificates use ECDSA P-256 or P-384 keys made by `ferry tls csr`", csr.PublicKey)
	}
	if csr.Subject.CommonName != req.Name || !slices.Equal(csr.Subject.OrganizationalUnit, []string{req.Kind}) {
		return nil, "", fmt.Errorf("the CSR asks for name %q with role %v, but --name %q --role %s was approved: refusing", csr.Subject.CommonName, csr.Subject.OrganizationalUnit, req.Name, req.Kind)
	}
	dns, ips := sans(req.Name, req.Hosts)
	for _, d := range csr.DNSNames {
		if !slices.Contains(dns, d) {
			return nil, "", fmt.Errorf("the CSR asks for host %q, which was not approved with --host", d)
		}
	}
	for _, ip := range csr.IPAddresses {
		if !slices.ContainsFunc(ips, ip.Equal) {
			return nil, "", fmt.Errorf("the CSR asks for address %s, which was not approved with --host", ip)
		}
	}
	if len(csr.URIs) > 0 || len(csr.EmailAddresses) > 0 {
		return nil, "", errors.New("the CSR asks for URI or email names, which ferry certificates never carry")
	}
	return signLeaf(caDir, csr.PublicKey, req.Name, req.Kind, dns, ips, req.Validity)
}

// Renew re-signs the certificate certPEM, which the CA in caDir issued, for
// the same key, identity and hosts, valid for validity from now. The host's
// key does not move: it sends its current certificate (public) and
// installs the one returned. The CA host's operator decides; a revoked
// serial should not be renewed (`ferry tls revoked` lists them).
func Renew(caDir string, certPEM []byte, validity time.Duration) ([]byte, string, error) {
	old, err := ParseCertPEM(certPEM)
	if err != nil {
		return nil, "", err
	}
	ca, _, err := loadCA(caDir)
	if err != nil {
		return nil, "", err
	}
	if err := old.CheckSignatureFrom(ca); err != nil {
		return nil, "", fmt.Errorf("the certificate was not issued by the CA in %s: %w", caDir, err)
	}
	id, err := IdentityOf(old)
	if err != nil {
		return nil, "", err
	}
	var ips []net.IP
	for _, ip := range old.IPAddresses {
		if v4 := ip.To4(); v4 != nil {
			ip = v4
		}
		ips = append(ips, ip)
	}
	return signLeaf(caDir, old.PublicKey, id.Name, id.Kind, old.DNSNames, ips, validity)
}

func signLeaf(caDir string, pub any, name, kind string, dns []string, ips []net.IP, validity time.Duration) ([]byte, string, error) {
	if validity == 0 {
		validity = DefaultValidity
	}
	if validity < time.Hour || validity > MaxValidity {
		return nil, "", fmt.Errorf("validity %s: use 1h to %s", validity, MaxValidity)
	}
	ca, caK, err := loadCA(caDir)
	if err != nil {
		return nil, "", err
	}
	now := time.Now()
	notAfter := now.Add(validity)
	if notAfter.After(ca.NotAfter) {
		notAfter = ca.NotAfter
	}
	sn := serial()
	tmpl := &x509.Certificate{
		SerialNumber: sn,
		Subject:      pkix.Name{CommonName: name, OrganizationalUnit: []string{kind}, Organization: []string{"ferry"}},
		NotBefore:    now.Add(-5 * time.Minute), // tolerate small clock skew
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     dns,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, pub, caK)
	if err != nil {
		return nil, "", fmt.Errorf("signing certificate for %s: %w", name, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), SerialString(sn), nil
}

// SerialString is a serial as the deny list and `ferry tls revoke` write it.
func SerialString(n *big.Int) string { return n.Text(16) }

// ParseCertPEM parses the first certificate of a PEM file.
func ParseCertPEM(b []byte) (*x509.Certificate, error) {
	p, _ := pem.Decode(b)
	if p == nil || p.Type != "CERTIFICATE" {
		return nil, errors.New("not a PEM certificate")
	}
	c, err := x509.ParseCertificate(p.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing certificate: %w", err)
	}
	return c, nil
}

// InstallCert writes certPEM as name's certificate in dir (atomically),
// after checking it is for the key in dir and chains to dir's ca.pem. An
// existing certificate is replaced only with force (renewal passes it).
func InstallCert(dir, name string, certPEM []byte, force bool) error {
	cf, kf := Files(dir, name)
	if _, err := tls.X509KeyPair(certPEM, mustRead(kf)); err != nil {
		return fmt.Errorf("the certificate does not match the key %s (was the CSR made here?): %w", kf, err)
	}
	c, err := ParseCertPEM(certPEM)
	if err != nil {
		return err
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, caCert))
	if err != nil {
		return fmt.Errorf("reading CA certificate: %w (copy ca.pem from the CA host into %s)", err, dir)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("%s holds no certificate", filepath.Join(dir, caCert))
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("the certificate does not chain to %s: %w", filepath.Join(dir, caCert), err)
	}
	if id, err := IdentityOf(c); err != nil || id.Name != name {
		return fmt.Errorf("the certificate names %q, not %q: %v", c.Subject.CommonName, name, err)
	}
	return WriteFileAtomic(cf, certPEM, 0o644, force)
}

func mustRead(p string) []byte {
	b, _ := os.ReadFile(p)
	return b
}

// IssueOptions tune Issue.
type IssueOptions struct {
	Force    bool          // replace an existing key and certificate
	Validity time.Duration // 0: DefaultValidity
}

// Issue makes name's key and CSR in dir, signs it with the CA in caDir and
// installs the certificate and the CA certificate in dir: the one-host
// shortcut of NewCSR + Sign + InstallCert, for development and for a host
// that is itself the CA host. It refuses when caDir is dir.
func Issue(caDir, dir, name, kind string, hosts []string, opts IssueOptions) (string, error) {
	if a, b := filepath.Clean(caDir), filepath.Clean(dir); a == b {
		return "", fmt.Errorf("the CA folder %s cannot be the runtime folder: keep the CA key out of --tls-dir", a)
	}
	if err := CheckRuntimeDir(dir); err != nil {
		return "", err
	}
	cf, _ := Files(dir, name)
	if !opts.Force {
		if _, err := os.Lstat(cf); err == nil {
			return "", fmt.Errorf("%s already exists: pass --force to issue a new key and certificate, or `ferry tls renew` to extend it", cf)
		}
	}
	if err := copyCACert(caDir, dir); err != nil {
		return "", err
	}
	csrPath, err := NewCSR(dir, name, kind, hosts, opts.Force)
	if err != nil {
		return "", err
	}
	csr, err := os.ReadFile(csrPath)
	if err != nil {
		return "", err
	}
	cert, sn, err := Sign(caDir, csr, SignRequest{Name: name, Kind: kind, Hosts: hosts, Validity: opts.Validity})
	if err != nil {
		return "", err
	}
	if err := InstallCert(dir, name, cert, opts.Force); err != nil {
		return "", err
	}
	os.Remove(csrPath)
	return sn, nil
}

// copyCACert puts caDir's ca.pem into dir (creating dir 0700) if it is not
// there yet, and refuses a dir trusting another CA.
func copyCACert(caDir, dir string) error {
	want, err := os.ReadFile(filepath.Join(caDir, caCert))
	if err != nil {
		return fmt.Errorf("reading CA certificate: %w (make the CA with `ferry tls init --dir %s`)", err, caDir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	p := filepath.Join(dir, caCert)
	have, err := os.ReadFile(p)
	if err == nil {
		if !bytesEqualTrim(have, want) {
			return fmt.Errorf("%s trusts another CA than %s: refusing to mix them", p, caDir)
		}
		return nil
	}
	return WriteFileAtomic(p, want, 0o644, false)
}

func bytesEqualTrim(a, b []byte) bool {
	return strings.TrimSpace(string(a)) == strings.TrimSpace(string(b))
}

// Cert names one certificate EnsureDev makes.
type Cert struct {
	Name, Kind string
	Hosts      []string
}

// EnsureDev is the development shortcut: a CA in DevCADir(tlsDir) (made if
// missing), its ca.pem in tlsDir, and each named certificate that does not
// exist yet issued into tlsDir. A development folder from before the CA
// key was kept apart has its ca-key.pem moved to DevCADir.
func EnsureDev(tlsDir string, certs ...Cert) error {
	caDir := DevCADir(tlsDir)
	old := filepath.Join(tlsDir, caKey)
	if _, err := os.Lstat(old); err == nil {
		if _, err := os.Lstat(filepath.Join(caDir, caKey)); err == nil {
			return CheckRuntimeDir(tlsDir)
		}
		if err := os.MkdirAll(caDir, 0o700); err != nil {
			return fmt.Errorf("creating %s: %w", caDir, err)
		}
		if err := os.Rename(old, filepath.Join(caDir, caKey)); err != nil {
			return fmt.Errorf("moving the CA key out of %s: %w", tlsDir, err)
		}
		if err := copyFile(filepath.Join(tlsDir, caCert), filepath.Join(caDir, caCert)); err != nil {
			return err
		}
	}
	if _, err := os.Stat(filepath.Join(caDir, caCert)); err != nil {
		if err := InitCA(caDir); err != nil {
			return err
		}
	}
	if err := copyCACert(caDir, tlsDir); err != nil {
		return err
	}
	for _, c := range certs {
		cf, _ := Files(tlsDir, c.Name)
		b, err := os.ReadFile(cf)
		if err != nil {
			if _, err := Issue(caDir, tlsDir, c.Name, c.Kind, c.Hosts, IssueOptions{Force: true}); err != nil {
				return err
			}
			continue
		}
		// A development cluster outlives its 30-day leaves: renew those
		// in their last third, as an operator would with `ferry tls renew`.
		if old, err := ParseCertPEM(b); err == nil && time.Until(old.NotAfter) < DefaultValidity/3 {
			cert, _, err := Renew(caDir, b, DefaultValidity)
			if err != nil {
				return fmt.Errorf("renewing development certificate %s: %w", cf, err)
			}
			if err := InstallCert(tlsDir, c.Name, cert, true); err != nil {
				return err
			}
		}
	}
	return nil
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return fmt.Errorf("reading %s: %w", from, err)
	}
	return WriteFileAtomic(to, b, 0o644, true)
}

// WithDenyList returns a copy of a server config that also refuses any
// peer whose certificate serial revoked reports, on every handshake
// (resumed ones included: crypto/tls calls VerifyConnection for both).
func WithDenyList(c *tls.Config, revoked func(serial string) bool) *tls.Config {
	out := c.Clone()
	prev := c.VerifyConnection
	out.VerifyConnection = func(cs tls.ConnectionState) error {
		if prev != nil {
			if err := prev(cs); err != nil {
				return err
			}
		}
		for _, pc := range cs.PeerCertificates {
			if sn := SerialString(pc.SerialNumber); revoked(sn) {
				return fmt.Errorf("certificate %s (%q) is revoked", sn, pc.Subject.CommonName)
			}
		}
		return nil
	}
	return out
}
