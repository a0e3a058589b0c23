package iscsi

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/tlsutil"
)

// GateTLS makes the gate speak TLS. With ClientCAPEM set, a client must
// present a certificate signed by it (mutual TLS, both ends ferry); with
// Peer set too, only the certificate naming that worker is admitted (a
// migration's target), so another worker's certificate from the same CA
// reads nothing. PEM bytes rather than a tls.Config because they travel to
// the export process.
type GateTLS struct {
	CertPEM     []byte `json:"cert_pem"`
	KeyPEM      []byte `json:"key_pem"`
	ClientCAPEM []byte `json:"client_ca_pem,omitempty"`
	// Peer is the one worker whose certificate is admitted.
	Peer string `json:"peer,omitempty"`
}

// GateTLSFromDir is the gate TLS of a worker's export: this worker's
// certificate (name in dir) and the cluster CA, admitting only the worker
// peer.
func GateTLSFromDir(dir, name, peer string) (*GateTLS, error) {
	cert, key, ca, err := tlsutil.KeyPairPEM(dir, name)
	if err != nil {
		return nil, fmt.Errorf("export TLS: %w", err)
	}
	return &GateTLS{CertPEM: cert, KeyPEM: key, ClientCAPEM: ca, Peer: peer}, nil
}

func (g *GateTLS) config() (*tls.Config, error) {
	cert, err := tls.X509KeyPair(g.CertPEM, g.KeyPEM)
	if err != nil {
		return nil, fmt.Errorf("gate TLS certificate: %w", err)
	}
	c := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
	if len(g.ClientCAPEM) > 0 {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(g.ClientCAPEM) {
			return nil, errors.New("gate TLS client CA: no certificate in the PEM")
		}
		c.ClientCAs, c.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	if g.Peer != "" {
		if len(g.ClientCAPEM) == 0 {
			return nil, errors.New("gate TLS: admitting one peer needs the client CA")
		}
		// Runs after the chain was verified against ClientCAs.
		c.VerifyConnection = tlsutil.PeerIs(tlsutil.Identity{Name: g.Peer, Kind: tlsutil.KindWorker})
	}
	return c, nil
}

// allowList holds the addresses and prefixes admitted by the gate.
type allowList []netip.Prefix

func parseAllow(items []string) (allowList, error) {
	if len(items) == 0 {
		return nil, errors.New("export needs at least one allowed address (--allow): an open gate would admit anyone")
	}
	var out allowList
	for _, s := range items {
		s = strings.TrimSpace(s)
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("allowed address %q: want an IP address or CIDR prefix", truncate(s, 64))
		}
		a = a.Unmap()
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

func (al allowList) admits(addr net.Addr) bool {
	ta, ok := addr.(*net.TCPAddr)
	if !ok {
		return false
	}
	a, ok := netip.AddrFromSlice(ta.IP)
	if !ok {
		return false
	}
	a = a.Unmap()
	for _, p := range al {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// gate is the only way to the target: it accepts on the host-namespace
// listener, drops every peer not on the allow list before reading a byte,
// and splices admitted connections to gotgt's loopback inside the private
// namespace.
type gate struct {
	log     zerolog.Logger
	ln      net.Listener
	allow   allowList
	tls     *tls.Config
	backend string // gotgt, inside the namespace

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func (g *gate) serve() error {
	for {
		c, err := g.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("gate accept: %w", err)
		}
		if !g.allow.admits(c.RemoteAddr()) {
			g.log.Warn().Str("peer", c.RemoteAddr().String()).Msg("gate refused a connection from an address that is not allowed")
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.SetLinger(0) // reset: the peer learns nothing, not even a FIN handshake
			}
			c.Close()
			continue
		}
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			g.splice(c)
		}()
	}
}

func (g *gate) track(c net.Conn, add bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if add {
		g.conns[c] = struct{}{}
	} else {
		delete(g.conns, c)
	}
}

func (g *gate) splice(c net.Conn) {
	peer := c.RemoteAddr().String()
	g.track(c, true)
	defer g.track(c, false)
	defer c.Close()
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	if g.tls != nil {
		t := tls.Server(c, g.tls)
		_ = t.SetDeadline(time.Now().Add(10 * time.Second))
		if err := t.Handshake(); err != nil {
			g.log.Warn().Str("peer", peer).Err(err).Msg("gate TLS handshake failed")
			return
		}
		_ = t.SetDeadline(time.Time{})
		g.track(c, false)
		c = t
		g.track(c, true)
		defer c.Close()
	}
	b, err := net.DialTimeout("tcp", g.backend, 5*time.Second)
	if err != nil {
		g.log.Error().Err(err).Msg("gate cannot reach the target inside the namespace")
		return
	}
	defer b.Close()
	_ = b.(*net.TCPConn).SetNoDelay(true)
	g.log.Info().Str("peer", peer).Msg("gate admitted a connection")
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(b, c); _ = b.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, b); done <- struct{}{} }()
	<-done
	// One direction ended: the session is over either way.
	c.Close()
	b.Close()
	<-done
	g.log.Info().Str("peer", peer).Msg("gate connection closed")
}

// close stops accepting and cuts every spliced connection.
func (g *gate) close() {
	g.ln.Close()
	g.mu.Lock()
	for c := range g.conns {
		c.Close()
	}
	g.mu.Unlock()
	g.wg.Wait()
}
