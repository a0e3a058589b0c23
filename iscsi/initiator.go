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
	QueueDepth    int           // commands in flight; default 16
	MaxTransfer   int           // bytes per READ(16); default 1 MiB
}

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
	return nil
}

// LUN is a remote iSCSI logical unit used as a read-only blockdev.Device.
// ReadAt is safe for concurrent use; large reads are split and pipelined.
// A lost connection is re-established and its outstanding reads re-issued;
// a read that cannot complete within Timeout fails with ErrTimeout.
type LUN struct {
	cfg       InitiatorConfig
	log       zerolog.Logger
	isid      [6]byte
	size      int64
	blockSize int64
	sem       chan struct{}

	mu         sync.Mutex
	sess       *session
	connecting chan struct{}
	connErr    error
	closed     bool
}

var _ blockdev.Device = (*LUN)(nil)

// Dial logs in to the target, checks the unit is ready and reads its size.
func Dial(ctx context.Context, log zerolog.Logger, cfg InitiatorConfig) (*LUN, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	l := &LUN{
		cfg: cfg, log: logging.For(log, "iscsi-initiator").With().Str("portal", cfg.Portal).Str("iqn", cfg.IQN).Logger(),
		isid: randomISID(), sem: make(chan struct{}, cfg.QueueDepth),
	}
	deadline := time.Now().Add(cfg.Timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if _, err := l.session(ctx, deadline); err != nil {
		return nil, err
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

// session returns the live session, logging in again if there is none. The
// login runs in its own goroutine, bounded by Timeout, shared by every
// caller that needs it; a caller stops waiting at its ctx or deadline.
func (l *LUN) session(ctx context.Context, deadline time.Time) (*session, error) {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for {
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			return nil, blockdev.ErrClosed
		}
		if l.sess != nil && l.sess.alive() {
			s := l.sess
			l.mu.Unlock()
			return s, nil
		}
		ch := l.connecting
		if ch == nil {
			ch = make(chan struct{})
			l.connecting = ch
			go l.reconnect(l.sess, ch)
		}
		l.mu.Unlock()
		select {
		case <-ch:
			l.mu.Lock()
			err := l.connErr
			l.mu.Unlock()
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

// reconnect replaces a dead session (old may be nil) and signals done.
func (l *LUN) reconnect(old *session, done chan struct{}) {
	if old != nil {
		<-old.readerDone
	}
	l.mu.Lock()
	portal, iqn := l.cfg.Portal, l.cfg.IQN
	l.mu.Unlock()
	s, err := l.connect(time.Now().Add(l.cfg.Timeout), portal, iqn)
	l.mu.Lock()
	l.connecting = nil
	l.connErr = err
	if err == nil {
		if l.closed {
			s.kill(blockdev.ErrClosed)
		} else {
			l.sess = s
		}
	}
	l.mu.Unlock()
	close(done)
}

func (l *LUN) connect(deadline time.Time, portal, iqn string) (*session, error) {
	c, err := dialConn(deadline, portal, l.cfg.TLS)
	if err != nil {
		return nil, err
	}
	p, err := login(c, deadline, l.isid, l.cfg.InitiatorName, iqn)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("logging in to %s at %s: %w", iqn, portal, err)
	}
	l.log.Debug().Uint16("tsih", p.tsih).Msg("logged in")
	return newSession(l.log, c, p, l.cfg.LUN, l.cfg.Timeout), nil
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
	s, err := l.connect(deadline, portal, iqn)
	if err != nil {
		return fmt.Errorf("the moved export: %w", err)
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		s.kill(blockdev.ErrClosed)
		return blockdev.ErrClosed
	}
	old := l.sess
	l.cfg.Portal, l.cfg.IQN, l.sess = portal, iqn, s
	l.mu.Unlock()
	if old != nil {
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
		s, err := l.session(ctx, deadline)
		if err != nil {
			if errors.Is(err, blockdev.ErrClosed) || errors.Is(err, context.Canceled) {
				return err
			}
			var le *LoginError
			if errors.As(err, &le) && le.Class == 2 {
				return err // the target refuses us: retrying cannot help
			}
			lastErr = err
			continue
		}
		err = s.exec(ctx, t, deadline)
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
		lastErr = err
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

// Close logs out and drops the connection; later calls fail with ErrClosed.
func (l *LUN) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	s := l.sess
	l.sess = nil
	l.mu.Unlock()
	if s == nil || !s.alive() {
		return nil
	}
	if err := s.logout(min(l.cfg.Timeout, 3*time.Second)); err != nil {
		l.log.Debug().Err(err).Msg("logout")
	}
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
