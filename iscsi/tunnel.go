package iscsi

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// Tunnel lets an initiator that speaks no TLS (open-iscsi) reach a TLS
// gate: it listens on loopback and forwards each connection over mutual
// TLS to the remote gate, whose certificate its config checks. Only this
// host reaches the listener; the fabric sees TLS alone.
type Tunnel struct {
	log    zerolog.Logger
	ln     net.Listener
	remote string
	tls    *tls.Config
	denied func(serial string) bool // nil: no deny list
	ctx    context.Context          // cancelled by Close: no dial outlives the tunnel
	cancel context.CancelFunc

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	serials map[net.Conn]string // TLS connections to the source: the source's serial
	closed  bool
	wg      sync.WaitGroup
}

// denyRecheck is how often a tunnel checks its live connections against
// the deny list: a source revoked meanwhile serves no more than this.
const denyRecheck = time.Second

// StartTunnel listens on listen (a loopback address; port 0 picks one) and
// forwards to remote over TLS with cfg, which must check the remote's
// certificate. Re-listening on a recorded port is how a restarted agent
// adopts the tunnel an initiator reconnects to. With denied (the agent's
// copy of the revoked serials, DenyList.Denied), a source whose certificate
// is revoked is refused at the handshake and cut when revoked later.
func StartTunnel(log zerolog.Logger, listen, remote string, cfg *tls.Config, denied func(serial string) bool) (*Tunnel, error) {
	if cfg == nil {
		return nil, errors.New("tunnel needs a TLS config: it exists to keep the fabric encrypted")
	}
	ap, err := netip.ParseAddrPort(listen)
	if err != nil || !ap.Addr().IsLoopback() {
		return nil, fmt.Errorf("tunnel listen address %q: want a loopback ip:port (the tunnel must not be reachable from the fabric)", listen)
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("tunnel to %s: listen on %s: %w", remote, listen, err)
	}
	t := &Tunnel{log: log.With().Str("remote", remote).Str("listen", ln.Addr().String()).Logger(),
		ln: ln, remote: remote, tls: cfg.Clone(), denied: denied, conns: map[net.Conn]struct{}{}, serials: map[net.Conn]string{}}
	if denied != nil {
		verify, deny := t.tls.VerifyConnection, denyCheck(denied)
		t.tls.VerifyConnection = func(cs tls.ConnectionState) error {
			if verify != nil {
				if err := verify(cs); err != nil {
					return err
				}
			}
			return deny(cs)
		}
	}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	t.wg.Add(1)
	go t.serve()
	if denied != nil {
		t.wg.Add(1)
		go t.recheck()
	}
	t.log.Info().Msg("TLS tunnel to the source's export listening")
	return t, nil
}

// Addr is the loopback portal the initiator logs into.
func (t *Tunnel) Addr() string { return t.ln.Addr().String() }

func (t *Tunnel) serve() {
	defer t.wg.Done()
	for {
		c, err := t.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			t.log.Warn().Err(err).Msg("tunnel accept")
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if !t.track(c, true) {
			c.Close()
			return
		}
		t.wg.Add(1)
		go func() {
			defer t.wg.Done()
			defer t.track(c, false)
			t.forward(c)
		}()
	}
}

// track adds or drops a connection; false once the tunnel is closed.
func (t *Tunnel) track(c net.Conn, add bool) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !add {
		delete(t.conns, c)
		delete(t.serials, c)
		return true
	}
	if t.closed {
		return false
	}
	t.conns[c] = struct{}{}
	return true
}

func (t *Tunnel) forward(c net.Conn) {
	defer c.Close()
	ctx, cancel := context.WithTimeout(t.ctx, 10*time.Second)
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: t.tls}
	rc, err := d.DialContext(ctx, "tcp", t.remote)
	cancel()
	if err != nil {
		// The initiator sees its connection close and retries the login.
		var rev *RevokedError
		if errors.As(err, &rev) {
			t.log.Warn().Str("serial", rev.Serial).Str("cert", rev.Name).Msg("tunnel refused the source: its certificate is revoked")
		} else {
			t.log.Warn().Err(err).Msg("tunnel cannot reach the source's export over TLS")
		}
		return
	}
	if !t.track(rc, true) {
		rc.Close()
		return
	}
	defer t.track(rc, false)
	if tc, ok := rc.(*tls.Conn); ok {
		t.mu.Lock()
		t.serials[rc] = peerSerial(tc)
		t.mu.Unlock()
	}
	defer rc.Close()
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(rc, c); _ = rc.(*tls.Conn).CloseWrite(); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, rc); done <- struct{}{} }()
	// One direction ending (or failing, e.g. a record altered on the way:
	// TLS reports it as an error) ends the session: cut both sides so the
	// initiator notices at once and reconnects.
	<-done
	c.Close()
	rc.Close()
	<-done
}

// recheck cuts, until Close, every connection to a source whose
// certificate got on the deny list after the handshake.
func (t *Tunnel) recheck() {
	defer t.wg.Done()
	tick := time.NewTicker(denyRecheck)
	defer tick.Stop()
	for {
		select {
		case <-t.ctx.Done():
			return
		case <-tick.C:
		}
		var cut []net.Conn
		t.mu.Lock()
		for c, sn := range t.serials {
			if t.denied(sn) {
				t.log.Warn().Str("serial", sn).Msg("tunnel cut a connection: the source's certificate was revoked")
				cut = append(cut, c)
			}
		}
		t.mu.Unlock()
		// Closed outside the lock: a TLS close may wait on its alert's write.
		for _, c := range cut {
			c.Close()
		}
	}
}

// Close stops listening and cuts every forwarded connection. Idempotent.
func (t *Tunnel) Close() {
	t.mu.Lock()
	already := t.closed
	t.closed = true
	t.cancel()
	for c := range t.conns {
		c.Close()
	}
	t.mu.Unlock()
	t.ln.Close()
	t.wg.Wait()
	if !already {
		t.log.Info().Msg("TLS tunnel closed")
	}
}
