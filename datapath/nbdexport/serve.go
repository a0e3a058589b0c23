package nbdexport

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
)

// DefaultInFlight is how many requests of one connection are served at
// once; the kernel keeps up to its queue depth (128 tags) outstanding.
const DefaultInFlight = 64

// slowRequest is how long a request may take before it is logged.
const slowRequest = 5 * time.Second

// zeroChunk is how much a write-zeroes request writes per call.
const zeroChunk = 1 << 20

// Server serves one device on any number of connections.
type Server struct {
	Log      zerolog.Logger
	Dev      blockdev.Device
	ReadOnly bool
	// InFlight bounds the requests of one connection served at once
	// (0: DefaultInFlight).
	InFlight int

	bufs sync.Pool
}

func (s *Server) buf(n int) []byte {
	if b, ok := s.bufs.Get().(*[]byte); ok && cap(*b) >= n {
		return (*b)[:n]
	}
	return make([]byte, n, max(n, 128<<10))
}

// putBuf returns b to the pool after clearing it: it held the device's
// bytes (plaintext when the device is a LUKS view).
func (s *Server) putBuf(b []byte) {
	if cap(b) <= 4<<20 {
		clear(b)
		s.bufs.Put(&b)
	}
}

// conn is one connection's state: replies are written whole under wmu.
type conn struct {
	s   *Server
	c   io.ReadWriteCloser
	wmu sync.Mutex
	err error // first write error, under wmu
	// broken is set with err: the reader checks it without waiting for a
	// reply being written.
	broken atomic.Bool
}

// Serve answers requests on c until the peer disconnects (NBD_CMD_DISC or
// end of stream), a request breaks the framing, or a reply cannot be
// written. Requests run concurrently (up to InFlight); Serve returns only
// once every one of them has replied or failed. A clean disconnect returns
// nil. c is closed on return.
func (s *Server) Serve(c io.ReadWriteCloser) error {
	defer c.Close()
	inFlight := s.InFlight
	if inFlight <= 0 {
		inFlight = DefaultInFlight
	}
	cn := &conn{s: s, c: c}
	slots := make(chan struct{}, inFlight)
	var wg sync.WaitGroup
	defer wg.Wait()
	hdr := make([]byte, requestLen)
	size := s.Dev.Size()
	for {
		if _, err := io.ReadFull(c, hdr); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("nbd: reading a request: %w", err)
		}
		r, err := ParseRequest(hdr)
		if err != nil {
			s.Log.Warn().Err(err).Msg("nbd connection closed")
			return err
		}
		var payload []byte
		if r.Type == cmdWrite {
			// The payload must be consumed even when the request is
			// refused, or the next header is read from its bytes.
			payload = s.buf(int(r.Length))
			if _, err := io.ReadFull(c, payload); err != nil {
				s.putBuf(payload)
				return fmt.Errorf("nbd: reading a write's %d bytes: %w", r.Length, err)
			}
		}
		if r.Type == cmdDisc {
			return nil
		}
		if errno := r.Check(size, s.ReadOnly); errno != 0 {
			if payload != nil {
				s.putBuf(payload)
			}
			s.Log.Debug().Uint16("type", r.Type).Uint64("offset", r.Offset).Uint32("length", r.Length).Msg("nbd request refused")
			if err := cn.send(r.Cookie, errno, nil); err != nil {
				return err
			}
			continue
		}
		slots <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			cn.serve(r, payload)
		}()
		if err := cn.writeErr(); err != nil {
			return err
		}
	}
}

func (cn *conn) writeErr() error {
	if !cn.broken.Load() {
		return nil
	}
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	return cn.err
}

// serve runs one checked request on the device and replies.
func (cn *conn) serve(r Request, payload []byte) {
	s := cn.s
	off := int64(r.Offset)
	t0 := time.Now()
	defer func() {
		// The kernel gives up on a request after its timeout and retries it
		// elsewhere; a slow one should be visible before that.
		if d := time.Since(t0); d > slowRequest {
			s.Log.Warn().Uint16("type", r.Type).Int64("offset", off).Uint32("length", r.Length).Dur("took", d).Msg("slow nbd request")
		}
	}()
	var err error
	switch r.Type {
	case cmdRead:
		b := s.buf(int(r.Length))
		defer s.putBuf(b)
		if _, err = s.Dev.ReadAt(b, off); err == nil {
			cn.send(r.Cookie, 0, b)
			return
		}
	case cmdWrite:
		defer s.putBuf(payload)
		if _, err = s.Dev.WriteAt(payload, off); err == nil && r.Flags&cmdFlagFUA != 0 {
			err = s.Dev.Flush()
		}
	case cmdFlush:
		err = s.Dev.Flush()
	case cmdTrim:
		err = s.Dev.Discard(off, int64(r.Length))
	case cmdWriteZeroes:
		err = cn.writeZeroes(off, int64(r.Length))
		if err == nil && r.Flags&cmdFlagFUA != 0 {
			err = s.Dev.Flush()
		}
	}
	if err != nil {
		s.Log.Warn().Err(err).Uint16("type", r.Type).Int64("offset", off).Uint32("length", r.Length).Msg("nbd request failed")
	}
	cn.send(r.Cookie, errnoOf(err), nil)
}

// writeZeroes writes zeros (not a discard: a discarded range need not read
// as zeros on every device).
func (cn *conn) writeZeroes(off, n int64) error {
	z := cn.s.buf(int(min(n, zeroChunk)))
	defer cn.s.putBuf(z)
	for n > 0 {
		k := min(n, int64(len(z)))
		if _, err := cn.s.Dev.WriteAt(z[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// send writes one reply, with data for a successful read, in one call.
func (cn *conn) send(cookie uint64, errno syscall.Errno, data []byte) error {
	var h [replyLen]byte
	reply(h[:], cookie, errno)
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	if cn.err != nil {
		return cn.err
	}
	var err error
	if nc, ok := cn.c.(net.Conn); ok && len(data) > 0 {
		bufs := net.Buffers{h[:], data}
		_, err = bufs.WriteTo(nc)
	} else {
		if _, err = cn.c.Write(h[:]); err == nil && len(data) > 0 {
			_, err = cn.c.Write(data)
		}
	}
	if err != nil {
		cn.err = fmt.Errorf("nbd: writing a reply: %w", err)
		cn.broken.Store(true)
		// Unblock the reader: the stream is broken.
		cn.c.Close()
	}
	return cn.err
}
