package iscsi

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/internal/logging"
	"github.com/ferry-dev/ferry/internal/retry"
)

// ErrTimeout is returned when a command got no answer within
// InitiatorConfig.Timeout, reconnection attempts included.
var ErrTimeout = errors.New("iSCSI target did not answer in time")

// InitiatorConfig says which LUN to read and how patiently.
type InitiatorConfig struct {
	Portal        string // host:port
	IQN           string // target name
	LUN           uint64
	InitiatorName string        // default: iqn.2026-01.dev.ferry:initiator
	Timeout       time.Duration // per command, reconnects included; default 10 s
	TLS           *tls.Config   // set when the export's gate speaks TLS
	// Denied reports a revoked certificate serial (tlsutil.SerialString,
	// e.g. DenyList.Denied): with TLS, a target presenting one is refused
	// at every handshake, and CutDenied ends live sessions to it. nil: no
	// deny list.
	Denied      func(serial string) bool
	QueueDepth  int // commands in flight; default 16
	MaxTransfer int // bytes per READ(16); default 1 MiB
	// Sessions is how many sessions (one connection each) carry the
	// commands, default 4. A target that runs each connection's commands
	// one after the other, as gotgt does, serves QueueDepth commands in
	// parallel only over several sessions; each is a separate I_T nexus,
	// harmless for a read-only source.
	Sessions int
}

// maxSessions bounds Sessions: each is a login and a connection on the target.
const maxSessions = 16

const defaultInitiatorName = "iqn.2026-01.dev.ferry:initiator"

func (c *InitiatorConfig) setDefaults() error {
	if c.Portal == "" || c.IQN == "" {
		return errors.New("iSCSI initiator: portal and IQN are required")
	}
	if _, _, err := net.SplitHostPort(c.Portal); err != nil {
		return fmt.Errorf("iSCSI portal %q: want host:port: %w", c.Portal, err)
	}
	if c.InitiatorName == "" {
		c.InitiatorName = defaultInitiatorName
	}
	if c.Timeout <= 0 {
		c.Timeout = 10 * time.Second
	}
	if c.QueueDepth <= 0 {
		c.QueueDepth = 16
	}
	if c.MaxTransfer <= 0 {
		c.MaxTransfer = 1 << 20
	}
	if c.Sessions <= 0 {
		c.Sessions = 4
	}
	if c.Sessions > maxSessions {
		return fmt.Errorf("iSCSI initiator: %d sessions: at most %d", c.Sessions, maxSessions)
	}
	return nil
}

// LUN is a remote iSCSI logical unit used as a read-only blockdev.Device.
// ReadAt is safe for concurrent use; large reads are split and pipelined
// over Sessions sessions. A lost connection is re-established and its
// outstanding reads re-issued; a read that cannot complete within Timeout
// fails with ErrTimeout.
type LUN struct {
	cfg       InitiatorConfig
	log       zerolog.Logger
	size      int64
	blockSize int64
	sem       chan struct{}
	paths     []*path
	next      atomic.Uint32 // round robin among equally loaded paths

	mu     sync.Mutex
	closed bool
}

// path is one session slot of a LUN: its session (nil or dead until a
// login succeeds) and the login under way, if any.
type path struct {
	isid     [6]byte
	inflight atomic.Int32
	// up: a login installed a session that was not yet seen dead. A hint
	// for pick only; session() is what checks.
	up atomic.Bool

	mu         sync.Mutex
	sess       *session
	connecting chan struct{}
	connErr    error
}

var _ blockdev.Device = (*LUN)(nil)

// Dial logs in to the target, checks the unit is ready and reads its size.
func Dial(ctx context.Context, log zerolog.Logger, cfg InitiatorConfig) (*LUN, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if cfg.TLS != nil && cfg.Denied != nil {
		// After the caller's own checks (the source's name): a revoked
		// source's handshake fails, so a reconnect reaches nothing.
		cfg.TLS = cfg.TLS.Clone()
		verify, deny := cfg.TLS.VerifyConnection, denyCheck(cfg.Denied)
		cfg.TLS.VerifyConnection = func(cs tls.ConnectionState) error {
			if verify != nil {
				if err := verify(cs); err != nil {
					return err
				}
			}
			return deny(cs)
		}
	}
	l := &LUN{
		cfg: cfg, log: logging.For(log, "iscsi-initiator").With().Str("portal", cfg.Portal).Str("iqn", cfg.IQN).Logger(),
		sem: make(chan struct{}, cfg.QueueDepth),
	}
	for i := 0; i < cfg.Sessions; i++ {
		l.paths = append(l.paths, &path{isid: randomISID()})
	}
	deadline := time.Now().Add(cfg.Timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	// The first session proves the target answers; the others log in
	// right after it.
	if _, err := l.session(ctx, l.paths[0], deadline); err != nil {
		l.Close() // a login still running in the background must not keep a session nobody owns
		return nil, err
	}
	// The other sessions log in now, in the background: the first reads
	// (a filesystem's mount, inside a migration's downtime) then find them
	// up instead of each waiting for a login of its own. They start before
	// the LUN's checks below, which need only the first.
	for _, p := range l.paths[1:] {
		l.warm(p)
	}
	if err := l.do(ctx, newTask("TEST UNIT READY", cdbTestUnitReady(), nil)); err != nil {
		l.Close()
		return nil, err
	}
	buf := make([]byte, 32)
	if err := l.do(ctx, newTask("READ CAPACITY(16)", cdbReadCapacity16(32), buf)); err != nil {
		l.Close()
		return nil, err
	}
	c, err := parseCapacity16(buf)
	if err != nil {
		l.Close()
		return nil, err
	}
	l.size, l.blockSize = int64(c.blocks)*int64(c.blockSize), int64(c.blockSize)
	if l.cfg.MaxTransfer < int(l.blockSize) {
		l.cfg.MaxTransfer = int(l.blockSize)
	}
	l.cfg.MaxTransfer -= l.cfg.MaxTransfer % int(l.blockSize)
	l.log.Debug().Int64("size", l.size).Int64("block_size", l.blockSize).Msg("LUN attached")
	return l, nil
}

// session returns p's live session, logging in again if there is none. The
// login runs in its own goroutine, bounded by Timeout, shared by every
// caller that needs it; a caller stops waiting at its ctx or deadline.
func (l *LUN) session(ctx context.Context, p *path, deadline time.Time) (*session, error) {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for {
		if l.isClosed() {
			return nil, blockdev.ErrClosed
		}
		p.mu.Lock()
		if p.sess != nil && p.sess.alive() {
			s := p.sess
			p.mu.Unlock()
			return s, nil
		}
		ch := p.connecting
		if ch == nil {
			ch = make(chan struct{})
			p.connecting = ch
			p.up.Store(false)
			go l.reconnect(p, p.sess, ch)
		}
		p.mu.Unlock()
		select {
		case <-ch:
			p.mu.Lock()
			err := p.connErr
			p.mu.Unlock()
			if err != nil {
				return nil, err
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-timer.C:
			portal, _ := l.Portal()
			return nil, fmt.Errorf("%w: reconnecting to %s", ErrTimeout, portal)
		}
	}
}

// warm starts p's login in the background unless p has a live session or
// a login under way.
func (l *LUN) warm(p *path) {
	if l.isClosed() {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if (p.sess != nil && p.sess.alive()) || p.connecting != nil {
		return
	}
	ch := make(chan struct{})
	p.connecting = ch
	go l.reconnect(p, p.sess, ch)
}

func (l *LUN) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// reconnect replaces p's dead session (old may be nil) and signals done.
func (l *LUN) reconnect(p *path, old *session, done chan struct{}) {
	if old != nil {
		<-old.readerDone
	}
	l.mu.Lock()
	portal, iqn := l.cfg.Portal, l.cfg.IQN
	l.mu.Unlock()
	s, err := l.connect(p.isid, time.Now().Add(l.cfg.Timeout), portal, iqn)
	// Lock order: l.mu before p.mu (Close holds l.mu while it collects).
	l.mu.Lock()
	p.mu.Lock()
	if err == nil && l.revoked(s) {
		err = &RevokedError{Serial: s.serial}
		s.kill(err)
	}
	p.connecting = nil
	p.connErr = err
	if err == nil {
		if l.closed {
			s.kill(blockdev.ErrClosed)
		} else {
			p.sess = s
			p.up.Store(true)
		}
	}
	p.mu.Unlock()
	l.mu.Unlock()
	close(done)
}

func (l *LUN) connect(isid [6]byte, deadline time.Time, portal, iqn string) (*session, error) {
	c, err := dialConn(deadline, portal, l.cfg.TLS)
	if err != nil {
		return nil, err
	}
	p, err := login(c, deadline, isid, l.cfg.InitiatorName, iqn)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("logging in to %s at %s: %w", iqn, portal, err)
	}
	l.log.Debug().Uint16("tsih", p.tsih).Msg("logged in")
	s := newSession(l.log, c, p, l.cfg.LUN, l.cfg.Timeout)
	if tc, ok := c.(*tls.Conn); ok {
		s.serial = peerSerial(tc)
	}
	return s, nil
}

// revoked reports whether s's target certificate is denied. Called under
// l.mu before a session is installed: a list changed during its handshake
// is seen either here or by CutDenied, which takes l.mu after the change.
func (l *LUN) revoked(s *session) bool {
	return l.cfg.Denied != nil && s.serial != "" && l.cfg.Denied(s.serial)
}

// CutDenied ends every live session whose target certificate Denied now
// reports (revoked after the handshake) and returns how many it ended.
// Commands in flight on them are re-issued on a new login, which the
// revoked certificate cannot pass: they fail with a *RevokedError.
func (l *LUN) CutDenied() int {
	if l.cfg.Denied == nil {
		return 0
	}
	var cut []*session
	l.mu.Lock()
	for _, p := range l.paths {
		p.mu.Lock()
		if s := p.sess; s != nil && s.alive() && l.revoked(s) {
			cut = append(cut, s)
		}
		p.mu.Unlock()
	}
	l.mu.Unlock()
	for _, s := range cut {
		l.log.Warn().Str("serial", s.serial).Msg("initiator cut a session: the target's certificate was revoked")
		s.kill(&RevokedError{Serial: s.serial})
	}
	return len(cut)
}

// pick returns the path with the fewest commands in flight, taking turns
// among equals so idle sessions are used before a busy one queues more. A
// path with a session comes before one still logging in, whose command
// would wait for the login.
func (l *LUN) pick() *path {
	start := int(l.next.Add(1))
	best := l.paths[start%len(l.paths)]
	for i := 1; i < len(l.paths); i++ {
		p := l.paths[(start+i)%len(l.paths)]
		if pu, bu := p.up.Load(), best.up.Load(); pu != bu {
			if pu {
				best = p
			}
			continue
		}
		if p.inflight.Load() < best.inflight.Load() {
			best = p
		}
	}
	return best
}

// errRetargeted ends the session to the old portal.
var errRetargeted = errors.New("the export moved to another portal")

// Retarget moves the LUN to the same volume exported at another portal
// and IQN (the source restarted elsewhere). It logs in there first, so a
// wrong address changes nothing; commands in flight on the old session are
// re-issued on the new one. Moving to where it already is does nothing.
func (l *LUN) Retarget(ctx context.Context, portal, iqn string) error {
	if _, _, err := net.SplitHostPort(portal); err != nil || iqn == "" {
		return fmt.Errorf("retarget to %q %q: want host:port and an IQN", portal, iqn)
	}
	l.mu.Lock()
	same := l.cfg.Portal == portal && l.cfg.IQN == iqn
	l.mu.Unlock()
	if same {
		return nil
	}
	deadline := time.Now().Add(l.cfg.Timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	first := l.paths[0]
	s, err := l.connect(first.isid, deadline, portal, iqn)
	if err != nil {
		return fmt.Errorf("the moved export: %w", err)
	}
	// Lock order: l.mu before p.mu. Every path's old session ends; the
	// first path takes the new one, the others log in to the new portal on
	// their next use (reconnect reads the portal under l.mu).
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		s.kill(blockdev.ErrClosed)
		return blockdev.ErrClosed
	}
	if l.revoked(s) {
		l.mu.Unlock()
		err := &RevokedError{Serial: s.serial}
		s.kill(err)
		return fmt.Errorf("the moved export: %w", err)
	}
	l.cfg.Portal, l.cfg.IQN = portal, iqn
	var olds []*session
	for i, p := range l.paths {
		p.mu.Lock()
		if p.sess != nil {
			olds = append(olds, p.sess)
		}
		p.sess = nil
		if i == 0 {
			p.sess = s
		}
		p.mu.Unlock()
	}
	l.mu.Unlock()
	for _, old := range olds {
		old.kill(errRetargeted)
	}
	l.log.Info().Str("new_portal", portal).Str("new_iqn", iqn).Msg("reconnected to the moved export")
	return nil
}

// Portal returns where the LUN connects now.
func (l *LUN) Portal() (portal, iqn string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cfg.Portal, l.cfg.IQN
}

// do runs one command to completion, re-issuing it on a new connection when
// the old one dies, until Timeout has passed since the first attempt.
func (l *LUN) do(ctx context.Context, t *task) error {
	deadline := time.Now().Add(l.cfg.Timeout)
	var lastErr error
	bo := retry.New(50*time.Millisecond, 500*time.Millisecond)
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		if attempt > 0 {
			backoff := bo.Next()
			if time.Now().Add(backoff).After(deadline) {
				return fmt.Errorf("%s: %w within %s: %w", t.op, ErrTimeout, l.cfg.Timeout, lastErr)
			}
			if !retry.Sleep(ctx, backoff) {
				return ctx.Err()
			}
			t.reset()
		}
		p := l.pick()
		s, err := l.session(ctx, p, deadline)
		if err != nil {
			if errors.Is(err, blockdev.ErrClosed) || errors.Is(err, context.Canceled) {
				return err
			}
			var le *LoginError
			if errors.As(err, &le) && le.Class == 2 {
				return err // the target refuses us: retrying cannot help
			}
			var rev *RevokedError
			if errors.As(err, &rev) {
				// Revocation is final: fail now, naming it, rather than
				// after Timeout of refused handshakes.
				return fmt.Errorf("%s: refusing the export: its certificate was revoked: %w", t.op, err)
			}
			lastErr = err
			continue
		}
		p.inflight.Add(1)
		err = s.exec(ctx, t, deadline)
		p.inflight.Add(-1)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			// The caller gave up (another part of its read failed): the
			// session may still deliver into t's buffer, so drop it.
			s.kill(ctx.Err())
			<-s.readerDone
			return ctx.Err()
		}
		var se *SCSIError
		if errors.As(err, &se) {
			if !se.retryable() {
				return err
			}
			lastErr = err
			continue
		}
		// Timeout, protocol error or lost connection: drop this session (its
		// reader must be gone before t's buffer is reused) and re-issue.
		s.kill(err)
		<-s.readerDone
		if attempt == 0 {
			l.log.Warn().Err(err).Str("op", t.op).Msg("iSCSI connection failed; reconnecting and re-issuing")
		}
		// A re-issued command that ran out of the time left says less than
		// what broke the sessions before it (an altered TLS record, a reset):
		// that stays the cause reported.
		if lastErr == nil || !errors.Is(err, errCmdTimeout) {
			lastErr = err
		}
	}
}

// Size is the LUN's size in bytes, from READ CAPACITY(16).
func (l *LUN) Size() int64 { return l.size }

// BlockSize is the LUN's logical block size.
func (l *LUN) BlockSize() int64 { return l.blockSize }

// ReadAt reads len(p) bytes at off. Unaligned requests are served through
// a bounce buffer; large ones are split into MaxTransfer commands that run
// concurrently, at most QueueDepth at once across all callers.
func (l *LUN) ReadAt(p []byte, off int64) (int, error) {
	if err := blockdev.CheckRange(off, len(p), l.size); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	bs := l.blockSize
	if off%bs != 0 || int64(len(p))%bs != 0 {
		start := off - off%bs
		end := (off + int64(len(p)) + bs - 1) / bs * bs
		tmp := make([]byte, end-start)
		if _, err := l.ReadAt(tmp, start); err != nil {
			return 0, err
		}
		return copy(p, tmp[off-start:]), nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	chunk := l.cfg.MaxTransfer
	if len(p) <= chunk {
		if err := l.readChunk(ctx, p, off); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	var (
		wg       sync.WaitGroup
		errMu    sync.Mutex
		firstErr error
	)
	for i := 0; i < len(p); i += chunk {
		end := min(i+chunk, len(p))
		wg.Add(1)
		go func(b []byte, at int64) {
			defer wg.Done()
			if err := l.readChunk(ctx, b, at); err != nil {
				errMu.Lock()
				if firstErr == nil {
					firstErr = err
					cancel() // fail the whole read now, not chunk by chunk
				}
				errMu.Unlock()
			}
		}(p[i:end], off+int64(i))
	}
	wg.Wait()
	if firstErr != nil {
		return 0, firstErr
	}
	return len(p), nil
}

func (l *LUN) readChunk(ctx context.Context, b []byte, off int64) error {
	select {
	case l.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-l.sem }()
	t := newTask("READ(16)", cdbRead16(uint64(off/l.blockSize), uint32(int64(len(b))/l.blockSize)), b)
	if err := l.do(ctx, t); err != nil {
		return fmt.Errorf("reading %d bytes at %d from %s: %w", len(b), off, l.cfg.IQN, err)
	}
	return nil
}

// writeImmediate sends a WRITE(16) whose data travels as immediate data.
// Ferry never writes to a source; tests use it to prove the export refuses.
func (l *LUN) writeImmediate(ctx context.Context, p []byte, off int64) error {
	if off%l.blockSize != 0 || int64(len(p))%l.blockSize != 0 || len(p) == 0 {
		return fmt.Errorf("write must be whole blocks")
	}
	t := newTask("WRITE(16)", cdbWrite16(uint64(off/l.blockSize), uint32(int64(len(p))/l.blockSize)), nil)
	t.out = p
	return l.do(ctx, t)
}

// WriteAt is refused: the migration source is read-only.
func (l *LUN) WriteAt([]byte, int64) (int, error) { return 0, blockdev.ErrReadOnly }

// Discard is refused: the migration source is read-only.
func (l *LUN) Discard(int64, int64) error { return blockdev.ErrReadOnly }

// Flush has nothing to make durable on a read-only device.
func (l *LUN) Flush() error { return nil }

// Close logs out and drops the connections; later calls fail with ErrClosed.
func (l *LUN) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	var live []*session
	for _, p := range l.paths {
		p.mu.Lock()
		if p.sess != nil && p.sess.alive() {
			live = append(live, p.sess)
		}
		p.sess = nil
		p.mu.Unlock()
	}
	l.mu.Unlock()
	var wg sync.WaitGroup
	for _, s := range live {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.logout(min(l.cfg.Timeout, 3*time.Second)); err != nil {
				l.log.Debug().Err(err).Msg("logout")
			}
		}()
	}
	wg.Wait()
	return nil
}

// CopyTo copies the whole LUN into w, keeping QueueDepth reads of
// MaxTransfer bytes in flight (the `ferry iscsi read` tool and benchmarks).
func (l *LUN) CopyTo(ctx context.Context, w io.WriterAt) (int64, error) {
	var (
		next     atomic.Int64
		copied   atomic.Int64
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	chunk := int64(l.cfg.MaxTransfer)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for i := 0; i < cap(l.sem); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk)
			for ctx.Err() == nil {
				off := next.Add(chunk) - chunk
				if off >= l.size {
					return
				}
				b := buf[:min(chunk, l.size-off)]
				err := l.readChunk(ctx, b, off)
				if err == nil {
					_, err = w.WriteAt(b, off)
				}
				if err != nil {
					errOnce.Do(func() { firstErr = err; cancel() })
					return
				}
				copied.Add(int64(len(b)))
			}
		}()
	}
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return copied.Load(), firstErr
}
