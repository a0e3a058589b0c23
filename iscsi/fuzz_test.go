package iscsi

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// fakeConn feeds a byte stream to the session reader and swallows writes.
type fakeConn struct {
	r io.Reader
}

func (c *fakeConn) Read(b []byte) (int, error)       { return c.r.Read(b) }
func (c *fakeConn) Write(b []byte) (int, error)      { return len(b), nil }
func (c *fakeConn) Close() error                     { return nil }
func (c *fakeConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *fakeConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *fakeConn) SetDeadline(time.Time) error      { return nil }
func (c *fakeConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fakeConn) SetWriteDeadline(time.Time) error { return nil }

func seedPDU(op byte, flags byte, itt uint32, off int, data []byte) []byte {
	p := new(pdu)
	p.bhs[0], p.bhs[1] = op, flags
	put32(p.bhs[16:20], itt)
	put32(p.bhs[40:44], uint32(off))
	p.data = data
	return p.marshal()
}

func fuzzSeeds(f *testing.F) {
	f.Add(seedPDU(opDataIn, 0x81, 1, 0, make([]byte, 512)))
	f.Add(seedPDU(opDataIn, 0x81, 1, 4000, make([]byte, 512)))
	f.Add(append(seedPDU(opSCSIResp, 0x80, 1, 0, []byte{0, 18, 0x70, 0, 7, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x27, 0, 0, 0, 0, 0}), seedPDU(opNOPIn, 0x80, reservedTag, 0, nil)...))
	f.Add(seedPDU(opReject, 0x80, reservedTag, 0, make([]byte, 48)))
	f.Add(seedPDU(opLoginResp, 0x87, 0, 0, []byte("MaxRecvDataSegmentLength=65536\x00HeaderDigest=None\x00")))
	f.Add(seedPDU(opAsyncMsg, 0x80, reservedTag, 0, nil))
	f.Add([]byte{0x25, 0x81, 0, 0, 255, 0xff, 0xff, 0xff})
}

// FuzzReadPDU: whatever a peer sends, parsing errors out or succeeds, never panics.
func FuzzReadPDU(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		for {
			p, err := readPDU(r, ourMaxRecvDataSegment)
			if err != nil {
				return
			}
			if p.dataLen() > ourMaxRecvDataSegment {
				t.Fatalf("accepted a %d-byte segment", p.dataLen())
			}
			_, _ = parseText(p.data)
			var e SCSIError
			parseSense(&e, p.data)
			_, _ = parseCapacity16(p.data)
			var lp loginParams
			if kv, err := parseText(p.data); err == nil {
				_ = applyLoginKeys(&lp, kv)
			}
		}
	})
}

// FuzzSessionReader runs the full-feature-phase reader over a hostile byte
// stream with reads outstanding: it must end with an error, never panic or
// write outside a task's buffer.
func FuzzSessionReader(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		s := newSessionForTest(&fakeConn{r: bytes.NewReader(b)})
		guard := make([]byte, 4096+16)
		t1 := newTask("READ(16)", cdbRead16(0, 8), guard[:4096])
		t2 := newTask("READ CAPACITY(16)", cdbReadCapacity16(32), make([]byte, 32))
		s.tasks[1], s.tasks[2] = t1, t2
		s.reader()
		for i, v := range guard[4096:] {
			if v != 0 {
				t.Fatalf("reader wrote past the task buffer at +%d", i)
			}
		}
	})
}

func newSessionForTest(c net.Conn) *session {
	return &session{
		conn: c, timeout: time.Second, tasks: make(map[uint32]*task), pings: make(map[uint32]chan struct{}),
		windowCh: make(chan struct{}), deadCh: make(chan struct{}), logoutCh: make(chan struct{}),
		readerDone: make(chan struct{}), nextITT: 1, br: bufio.NewReader(c),
		nopReplies: make(chan *pdu, maxPendingNOPReplies),
	}
}
