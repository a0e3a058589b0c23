package iscsi

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/childctl"
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
	// Denied are revoked certificate serials (tlsutil.SerialString): the
	// gate refuses a handshake presenting one. The source agent sends the
	// current list at start and then pushes updates (Export.SetDenied).
	Denied []string `json:"denied,omitempty"`
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

// maxDenied bounds a deny list a gate or tunnel takes: revoked leaves
// expire within their validity, so the list stays far below this.
const maxDenied = 100000

// DenyList is a set of revoked certificate serials (tlsutil.SerialString
// form) the gate and the tunnel refuse. The zero value denies nothing; a
// nil *DenyList too. Safe for concurrent use.
type DenyList struct {
	mu  sync.RWMutex
	set map[string]struct{}
}

// Set replaces the list and reports whether it changed. Serials are taken
// in canonical form only: a malformed one could never match a certificate.
func (d *DenyList) Set(serials []string) (bool, error) {
	if len(serials) > maxDenied {
		return false, fmt.Errorf("deny list of %d serials exceeds %d", len(serials), maxDenied)
	}
	next := make(map[string]struct{}, len(serials))
	for _, sn := range serials {
		n, ok := new(big.Int).SetString(sn, 16)
		if !ok || n.Sign() <= 0 || tlsutil.SerialString(n) != sn {
			return false, fmt.Errorf("deny list: serial %q is not canonical lowercase hex", truncate(sn, 64))
		}
		next[sn] = struct{}{}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	changed := len(next) != len(d.set)
	if !changed {
		for sn := range next {
			if _, ok := d.set[sn]; !ok {
				changed = true
				break
			}
		}
	}
	d.set = next
	return changed, nil
}

// Denied reports whether serial is on the list.
func (d *DenyList) Denied(serial string) bool {
	if d == nil {
		return false
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	_, ok := d.set[serial]
	return ok
}

// Serials is the list, sorted.
func (d *DenyList) Serials() []string {
	if d == nil {
		return nil
	}
	d.mu.RLock()
	out := make([]string, 0, len(d.set))
	for sn := range d.set {
		out = append(out, sn)
	}
	d.mu.RUnlock()
	slices.Sort(out)
	return out
}

// RevokedError is the handshake error of a peer presenting a revoked
// certificate.
type RevokedError struct {
	Serial string
	Name   string // the certificate's common name
}

func (e *RevokedError) Error() string {
	if e.Name == "" {
		return fmt.Sprintf("certificate %s is revoked", e.Serial)
	}
	return fmt.Sprintf("certificate %s (%q) is revoked", e.Serial, e.Name)
}

// denyCheck is a VerifyConnection step refusing a peer whose leaf is denied.
func denyCheck(denied func(string) bool) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return nil // no certificate: the other checks refuse it
		}
		leaf := cs.PeerCertificates[0]
		if sn := tlsutil.SerialString(leaf.SerialNumber); denied(sn) {
			return &RevokedError{Serial: sn, Name: leaf.Subject.CommonName}
		}
		return nil
	}
}

// peerSerial is the serial of a TLS connection's peer leaf, "" without one.
func peerSerial(c *tls.Conn) string {
	cs := c.ConnectionState()
	if len(cs.PeerCertificates) == 0 {
		return ""
	}
	return tlsutil.SerialString(cs.PeerCertificates[0].SerialNumber)
}

// config is the gate's TLS; denied is consulted on every handshake.
func (g *GateTLS) config(denied func(string) bool) (*tls.Config, error) {
	cert, err := tls.X509KeyPair(g.CertPEM, g.KeyPEM)
	if err != nil {
		return nil, fmt.Errorf("gate TLS certificate: %w", err)
	}
	// Full 16 KiB records from the first byte: the export sends bulk data,
	// and crypto/tls otherwise sends a session's first 128 KiB in records of
	// one packet each (a write and a seal per 1.2 KiB).
	c := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13, DynamicRecordSizingDisabled: true}
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
	if denied != nil && len(g.ClientCAPEM) > 0 {
		peer, deny := c.VerifyConnection, denyCheck(denied)
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			if peer != nil {
				if err := peer(cs); err != nil {
					return err
				}
			}
			return deny(cs)
		}
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
	deny    DenyList // consulted by tls's handshakes (see newGate)
	backend string   // gotgt, inside the namespace

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	serials map[net.Conn]tlsPeer // admitted TLS connections: their peer
	wg      sync.WaitGroup
}

// tlsPeer is an admitted TLS connection's certificate serial and the TCP
// connection under it: cutting that one never waits on a TLS write.
type tlsPeer struct {
	serial string
	raw    net.Conn
}

// newGate is a gate on ln admitting allow, in front of backend; with gt
// its TLS, refusing gt.Denied and later setDenied serials.
func newGate(log zerolog.Logger, ln net.Listener, allow allowList, gt *GateTLS, backend string) (*gate, error) {
	g := &gate{log: log, ln: ln, allow: allow, backend: backend, conns: map[net.Conn]struct{}{}, serials: map[net.Conn]tlsPeer{}}
	if gt == nil {
		return g, nil
	}
	if _, err := g.deny.Set(gt.Denied); err != nil {
		return nil, err
	}
	var err error
	if g.tls, err = gt.config(g.deny.Denied); err != nil {
		return nil, err
	}
	return g, nil
}

// setDenied replaces the deny list and cuts every admitted connection whose
// certificate is now on it: a revoked target reads nothing more, even on a
// session it opened before.
func (g *gate) setDenied(serials []string) error {
	if _, err := g.deny.Set(serials); err != nil {
		return err
	}
	var cut []tlsPeer
	g.mu.Lock()
	for _, p := range g.serials {
		if g.deny.Denied(p.serial) {
			cut = append(cut, p)
		}
	}
	g.mu.Unlock()
	for _, p := range cut {
		g.log.Warn().Str("peer", p.raw.RemoteAddr().String()).Str("serial", p.serial).Msg("gate cut a connection: its certificate was revoked")
		p.raw.Close()
	}
	return nil
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
			var rev *RevokedError
			if errors.As(err, &rev) {
				g.log.Warn().Str("peer", peer).Str("serial", rev.Serial).Str("cert", rev.Name).Msg("gate refused a revoked certificate")
			} else {
				g.log.Warn().Str("peer", peer).Err(err).Msg("gate TLS handshake failed")
			}
			return
		}
		_ = t.SetDeadline(time.Time{})
		sn := peerSerial(t)
		g.mu.Lock()
		delete(g.conns, c)
		g.serials[t] = tlsPeer{serial: sn, raw: c}
		c = t
		g.conns[c] = struct{}{}
		// A revocation pushed during the handshake cut nothing yet.
		denied := g.deny.Denied(sn)
		g.mu.Unlock()
		defer func() {
			g.mu.Lock()
			delete(g.serials, t)
			delete(g.conns, t)
			g.mu.Unlock()
		}()
		defer c.Close()
		if denied {
			g.log.Warn().Str("peer", peer).Str("serial", sn).Msg("gate refused a revoked certificate")
			return
		}
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
	conns := make([]net.Conn, 0, len(g.conns))
	for c := range g.conns {
		conns = append(conns, c)
	}
	g.mu.Unlock()
	// Outside the lock, and the TCP connection under a TLS one: a TLS
	// close writes close_notify, which a stalled peer can hold up.
	for _, c := range conns {
		if tc, ok := c.(*tls.Conn); ok {
			c = tc.NetConn()
		}
		c.Close()
	}
	g.wg.Wait()
}

// deniedRequest is the body of the export child's POST /v1/denied.
type deniedRequest struct {
	Serials []string `json:"serials"`
}

// handleDenied is the export child's control endpoint for setDenied.
func (g *gate) handleDenied(w http.ResponseWriter, r *http.Request) {
	var req deniedRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, 8<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		childctl.Reply(w, nil, &childctl.Error{Status: http.StatusBadRequest, Message: "deny list: " + err.Error()})
		return
	}
	if g.tls == nil {
		childctl.Reply(w, nil, errors.New("this export speaks no TLS: it has no certificate to deny"))
		return
	}
	childctl.Reply(w, nil, g.setDenied(req.Serials))
}

// SetDenied sends the export's gate a new deny list: it refuses those
// serials from the next handshake on and cuts their live connections. A
// restarted export process starts with the last list sent.
func (e *Export) SetDenied(ctx context.Context, serials []string) error {
	e.mu.Lock()
	if e.cfg.TLS != nil && e.child != nil {
		var cc childConfig
		if err := json.Unmarshal(e.child, &cc); err == nil && cc.TLS != nil {
			cc.TLS.Denied = serials
			if b, err := json.Marshal(cc); err == nil {
				e.child = b
			}
		}
	}
	e.mu.Unlock()
	if serials == nil {
		serials = []string{}
	}
	if err := childctl.Dial(controlSocket(e.stateDir)).Call(ctx, http.MethodPost, "/v1/denied", deniedRequest{Serials: serials}, nil); err != nil {
		return fmt.Errorf("sending the deny list to the export of %s: %w", e.iqn, err)
	}
	return nil
}
