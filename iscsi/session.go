package iscsi

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
)

// ourMaxRecvDataSegment is the largest Data-In segment we accept: large
// segments cut per-PDU overhead on sequential reads.
const ourMaxRecvDataSegment = 256 << 10

// maxPendingNOPReplies bounds the NOP-Out answers waiting for the one
// responder: an honest target has one ping outstanding at a time, so more
// than this means a flood, and the session ends instead of queueing (each
// answer echoes up to ourMaxRecvDataSegment bytes).
const maxPendingNOPReplies = 8

var (
	errSessionDead = errors.New("iSCSI connection lost")
	errCmdTimeout  = errors.New("iSCSI command timed out")
)

// loginParams are the operational values both sides settled on.
type loginParams struct {
	targetMaxRecv  int // largest data segment we may send
	immediateData  bool
	firstBurst     int
	tsih           uint16
	statSN         uint32
	expCmdSN       uint32
	maxCmdSN       uint32
	targetPortalGr string
}

// task is one SCSI command and its outcome.
type task struct {
	op   string
	cdb  [16]byte
	in   []byte // Data-In buffer (reads)
	out  []byte // immediate data (writes, tests only)
	got  int
	err  error
	done chan struct{}
}

func newTask(op string, cdb [16]byte, in []byte) *task {
	return &task{op: op, cdb: cdb, in: in, done: make(chan struct{})}
}

func (t *task) reset() {
	t.got, t.err = 0, nil
	t.done = make(chan struct{})
}

// session is one logged-in TCP connection in full feature phase. It never
// reconnects itself: the LUN above drops a dead session and makes a new one.
type session struct {
	log     zerolog.Logger
	conn    net.Conn
	lun     [8]byte
	timeout time.Duration
	params  loginParams
	serial  string // the target certificate's serial over TLS, else ""

	wmu sync.Mutex // one writer at a time, CmdSN order on the wire

	mu        sync.Mutex
	cmdSN     uint32
	expCmdSN  uint32
	maxCmdSN  uint32
	expStatSN uint32
	nextITT   uint32
	tasks     map[uint32]*task
	pings     map[uint32]chan struct{}
	windowCh  chan struct{} // closed and replaced whenever MaxCmdSN grows
	dead      error
	deadCh    chan struct{}
	logoutCh  chan struct{}

	readerDone chan struct{}
	nopReplies chan *pdu    // NOP-Out answers to target pings, sent in order by nopResponder
	lastRecv   atomic.Int64 // unix nanoseconds
	// br batches header reads; large Data-In segments bypass its buffer
	// and land straight in the task's (bufio reads directly when asked
	// for more than it holds).
	br *bufio.Reader
}

// dialConn opens the TCP (and optional TLS) connection to a portal.
func dialConn(deadline time.Time, portal string, tlsCfg *tls.Config) (net.Conn, error) {
	d := net.Dialer{Deadline: deadline, KeepAlive: 15 * time.Second}
	c, err := d.Dial("tcp", portal)
	if err != nil {
		return nil, fmt.Errorf("connecting to iSCSI portal %s: %w", portal, err)
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	if tlsCfg != nil {
		if tlsCfg.ServerName == "" { // verify the portal's own address by default
			tlsCfg = tlsCfg.Clone()
			tlsCfg.ServerName, _, _ = net.SplitHostPort(portal)
		}
		tc := tls.Client(c, tlsCfg)
		_ = tc.SetDeadline(deadline)
		if err := tc.Handshake(); err != nil {
			c.Close()
			return nil, fmt.Errorf("TLS handshake with iSCSI portal %s: %w", portal, err)
		}
		_ = tc.SetDeadline(time.Time{})
		c = tc
	}
	return c, nil
}

func randomISID() [6]byte {
	var b [6]byte
	_, _ = rand.Read(b[:])
	b[0] = 0x80 | b[0]&0x3f // "random" ISID format (RFC 7143 §11.12.5)
	return b
}

// loginRequest sends one Login Request and returns the response.
func loginExchange(c net.Conn, req *pdu) (*pdu, error) {
	if _, err := c.Write(req.marshal()); err != nil {
		return nil, fmt.Errorf("sending login request: %w", err)
	}
	for {
		resp, err := readPDU(c, maxDataSegment)
		if err != nil {
			return nil, fmt.Errorf("reading login response: %w", err)
		}
		switch resp.opcode() {
		case opLoginResp:
			return resp, nil
		case opAsyncMsg, opNOPIn:
			continue
		case opReject:
			return nil, fmt.Errorf("%w: target rejected the login request (reason %#x)", ErrProtocol, resp.bhs[2])
		default:
			return nil, fmt.Errorf("%w: opcode %#x during login", ErrProtocol, resp.opcode())
		}
	}
}

// LoginError is a login the target refused (RFC 7143 §11.13.5).
type LoginError struct{ Class, Detail byte }

func (e *LoginError) Error() string {
	what := "refused"
	switch {
	case e.Class == 1:
		what = "redirected (not supported)"
	case e.Class == 2 && e.Detail == 1:
		what = "refused: authentication failed"
	case e.Class == 2 && e.Detail == 3:
		what = "refused: target not found (check the IQN)"
	case e.Class == 2:
		what = "refused by the target's policy"
	case e.Class == 3:
		what = "failed: target error"
	}
	return fmt.Sprintf("iSCSI login %s (status %d/%d)", what, e.Class, e.Detail)
}

// login runs the security and operational stages (RFC 7143 §6.3) and leaves
// c in full feature phase. target=="" means a discovery session.
func login(c net.Conn, deadline time.Time, isid [6]byte, initiator, target string) (loginParams, error) {
	_ = c.SetDeadline(deadline)
	defer c.SetDeadline(time.Time{})
	var p loginParams
	p.targetMaxRecv = 8192 // RFC default until the target says otherwise
	sessionType := "Normal"
	if target == "" {
		sessionType = "Discovery"
	}
	const itt = 0
	var cmdSN uint32 = 1
	var expStatSN uint32
	stage := 0 // 0 security, 1 operational
	sent := false
	for round := 0; round < 8; round++ {
		req := new(pdu)
		req.bhs[0] = opLoginReq | flagImmediate
		next := stage + 1
		if stage == 1 {
			next = 3
		}
		req.bhs[1] = 0x80 | byte(stage)<<2 | byte(next)
		copy(req.bhs[8:14], isid[:])
		put32(req.bhs[16:20], itt)
		put32(req.bhs[24:28], cmdSN)
		put32(req.bhs[28:32], expStatSN)
		var kv [][2]string
		if !sent {
			switch stage {
			case 0:
				kv = [][2]string{{"InitiatorName", initiator}, {"SessionType", sessionType}}
				if target != "" {
					kv = append(kv, [2]string{"TargetName", target})
				}
				kv = append(kv, [2]string{"AuthMethod", "None"})
			case 1:
				kv = [][2]string{
					{"HeaderDigest", "None"}, {"DataDigest", "None"},
					{"MaxRecvDataSegmentLength", strconv.Itoa(ourMaxRecvDataSegment)},
				}
				if target != "" {
					kv = append(kv, [][2]string{
						{"InitialR2T", "Yes"}, {"ImmediateData", "Yes"},
						{"MaxBurstLength", "16776192"}, {"FirstBurstLength", "262144"},
						{"DefaultTime2Wait", "0"}, {"DefaultTime2Retain", "0"},
						{"MaxOutstandingR2T", "1"}, {"DataPDUInOrder", "Yes"},
						{"DataSequenceInOrder", "Yes"}, {"ErrorRecoveryLevel", "0"},
						{"MaxConnections", "1"},
					}...)
				}
			}
			sent = true
		}
		req.data = encodeText(kv)
		resp, err := loginExchange(c, req)
		if err != nil {
			return p, err
		}
		if cls, det := resp.bhs[36], resp.bhs[37]; cls != 0 {
			return p, &LoginError{Class: cls, Detail: det}
		}
		expStatSN = resp.statSN() + 1
		p.statSN, p.expCmdSN, p.maxCmdSN = resp.statSN(), resp.expCmdSN(), resp.maxCmdSN()
		p.tsih = binary.BigEndian.Uint16(resp.bhs[14:16])
		keys, err := parseText(resp.data)
		if err != nil {
			return p, err
		}
		if err := applyLoginKeys(&p, keys); err != nil {
			return p, err
		}
		if resp.flags()&0x80 == 0 { // target wants another round in this stage
			continue
		}
		rnext := int(resp.flags() & 0x03)
		if rnext == 3 {
			return p, nil
		}
		if rnext != next {
			return p, fmt.Errorf("%w: target moved the login to stage %d", ErrProtocol, rnext)
		}
		stage, sent = rnext, false
	}
	return p, fmt.Errorf("%w: login did not finish after 8 rounds", ErrProtocol)
}

func applyLoginKeys(p *loginParams, keys map[string]string) error {
	for k, v := range keys {
		switch k {
		case "MaxRecvDataSegmentLength":
			n, err := strconv.Atoi(v)
			if err != nil || n < 512 || n > (1<<24)-1 {
				return fmt.Errorf("%w: MaxRecvDataSegmentLength=%q", ErrProtocol, truncate(v, 32))
			}
			p.targetMaxRecv = n
		case "ImmediateData":
			p.immediateData = v == "Yes"
		case "FirstBurstLength":
			if n, err := strconv.Atoi(v); err == nil {
				p.firstBurst = n
			}
		case "TargetPortalGroupTag":
			p.targetPortalGr = v
		case "HeaderDigest", "DataDigest":
			if v != "None" {
				return fmt.Errorf("%w: target insists on %s=%s, which ferry does not implement", ErrProtocol, k, truncate(v, 32))
			}
		case "AuthMethod":
			if v != "None" {
				return fmt.Errorf("iSCSI target requires authentication (%s), which ferry does not use: export without CHAP", truncate(v, 32))
			}
		}
	}
	return nil
}

// newSession starts the reader and keepalive of a logged-in connection.
func newSession(log zerolog.Logger, c net.Conn, p loginParams, lun uint64, timeout time.Duration) *session {
	s := &session{
		log: log, conn: c, lun: encodeLUN(lun), timeout: timeout, params: p,
		cmdSN: p.expCmdSN, expCmdSN: p.expCmdSN, maxCmdSN: p.maxCmdSN, expStatSN: p.statSN + 1,
		nextITT: 1, tasks: make(map[uint32]*task), pings: make(map[uint32]chan struct{}),
		windowCh: make(chan struct{}), deadCh: make(chan struct{}), logoutCh: make(chan struct{}),
		readerDone: make(chan struct{}), br: bufio.NewReaderSize(c, 32<<10),
		nopReplies: make(chan *pdu, maxPendingNOPReplies),
	}
	s.lastRecv.Store(time.Now().UnixNano())
	go s.reader()
	go s.keepalive()
	go s.nopResponder()
	return s
}

// nopResponder answers the target's pings, one at a time, until the session
// ends: a single goroutine however many NOP-In the target sends.
func (s *session) nopResponder() {
	for {
		select {
		case <-s.deadCh:
			return
		case r := <-s.nopReplies:
			if err := s.sendImmediate(r); err != nil {
				s.kill(err)
				return
			}
		}
	}
}

// kill ends the session once; waiters see errSessionDead wrapping cause.
func (s *session) kill(cause error) {
	s.mu.Lock()
	if s.dead == nil {
		s.dead = fmt.Errorf("%w: %w", errSessionDead, cause)
		close(s.deadCh)
		s.conn.Close()
	}
	s.mu.Unlock()
}

func (s *session) alive() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dead == nil
}

func (s *session) deadErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dead
}

func (s *session) allocITT() uint32 {
	itt := s.nextITT
	s.nextITT++
	if s.nextITT == reservedTag {
		s.nextITT = 1
	}
	return itt
}

// updateSN applies the ExpCmdSN/MaxCmdSN every target PDU carries
// (RFC 7143 §4.2.2.1), ignoring stale or invalid windows.
func (s *session) updateSN(p *pdu) {
	exp, max := p.expCmdSN(), p.maxCmdSN()
	if snLess(max, exp-1) {
		return
	}
	s.mu.Lock()
	if snLess(s.expCmdSN, exp) {
		s.expCmdSN = exp
	}
	if snLess(s.maxCmdSN, max) {
		s.maxCmdSN = max
		close(s.windowCh)
		s.windowCh = make(chan struct{})
	}
	s.mu.Unlock()
}

func (s *session) updateStatSN(sn uint32) {
	s.mu.Lock()
	if !snLess(sn+1, s.expStatSN) {
		s.expStatSN = sn + 1
	}
	s.mu.Unlock()
}

// exec sends t and waits for its completion until deadline.
func (s *session) exec(ctx context.Context, t *task, deadline time.Time) error {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	// Wait for room in the CmdSN window without holding the writer lock,
	// so NOP-In replies can still go out meanwhile.
	var itt uint32
	for {
		s.mu.Lock()
		if s.dead != nil {
			err := s.dead
			s.mu.Unlock()
			return err
		}
		if snLess(s.maxCmdSN, s.cmdSN) {
			ch := s.windowCh
			s.mu.Unlock()
			select {
			case <-ch:
			case <-s.deadCh:
			case <-timer.C:
				return fmt.Errorf("%w: %s waited %s for the target's command window", errCmdTimeout, t.op, s.timeout)
			case <-ctx.Done():
				return ctx.Err()
			}
			continue
		}
		s.mu.Unlock()
		s.wmu.Lock()
		s.mu.Lock()
		if s.dead != nil || snLess(s.maxCmdSN, s.cmdSN) {
			s.mu.Unlock()
			s.wmu.Unlock()
			continue
		}
		itt = s.allocITT()
		cmdSN := s.cmdSN
		s.cmdSN++
		s.tasks[itt] = t
		hdr := s.commandPDU(t, itt, cmdSN, s.expStatSN)
		s.mu.Unlock()
		_ = s.conn.SetWriteDeadline(deadline)
		_, err := s.conn.Write(hdr)
		s.wmu.Unlock()
		if err != nil {
			s.kill(err)
		}
		break
	}
	defer func() {
		s.mu.Lock()
		delete(s.tasks, itt)
		s.mu.Unlock()
	}()
	select {
	case <-t.done:
		return t.err
	case <-s.deadCh:
		return s.deadErr()
	case <-timer.C:
		return fmt.Errorf("%w: %s got no answer within %s", errCmdTimeout, t.op, s.timeout)
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *session) commandPDU(t *task, itt, cmdSN, expStatSN uint32) []byte {
	p := new(pdu)
	p.bhs[0] = opSCSICmd
	p.bhs[1] = flagFinal | 0x01 // simple task attribute
	edtl := len(t.in)
	if t.in != nil {
		p.bhs[1] |= 0x40 // R
	}
	if t.out != nil {
		p.bhs[1] |= 0x20 // W
		edtl = len(t.out)
		p.data = t.out
	}
	copy(p.bhs[8:16], s.lun[:])
	put32(p.bhs[16:20], itt)
	put32(p.bhs[20:24], uint32(edtl))
	put32(p.bhs[24:28], cmdSN)
	put32(p.bhs[28:32], expStatSN)
	copy(p.bhs[32:48], t.cdb[:])
	return p.marshal()
}

// sendImmediate writes an immediate non-SCSI PDU (NOP-Out, Logout).
func (s *session) sendImmediate(p *pdu) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	put32(p.bhs[24:28], s.cmdSN) // immediate: carries CmdSN without advancing it
	put32(p.bhs[28:32], s.expStatSN)
	s.mu.Unlock()
	_ = s.conn.SetWriteDeadline(time.Now().Add(s.timeout))
	_, err := s.conn.Write(p.marshal())
	return err
}

func (s *session) complete(t *task, err error) {
	s.mu.Lock()
	for itt, x := range s.tasks {
		if x == t {
			delete(s.tasks, itt)
		}
	}
	s.mu.Unlock()
	t.err = err
	close(t.done)
}

func (s *session) lookup(itt uint32) *task {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tasks[itt]
}

// reader dispatches every PDU from the target until the connection ends.
func (s *session) reader() {
	defer close(s.readerDone)
	var p pdu
	for {
		err := s.readOne(&p)
		if err != nil {
			s.kill(err)
			return
		}
	}
}

func (s *session) readOne(p *pdu) error {
	if err := readHeader(s.br, p, ourMaxRecvDataSegment); err != nil {
		return err
	}
	s.lastRecv.Store(time.Now().UnixNano())
	s.updateSN(p)
	n := p.dataLen()
	switch p.opcode() {
	case opDataIn:
		t := s.lookup(p.itt())
		if t == nil || t.in == nil {
			return s.discard(n) // a task we gave up on
		}
		off := p.bufferOffset()
		if off < 0 || off+n > len(t.in) {
			return fmt.Errorf("%w: Data-In at offset %d length %d for a %d-byte read", ErrProtocol, off, n, len(t.in))
		}
		// Login settled DataPDUInOrder and DataSequenceInOrder to Yes and
		// ErrorRecoveryLevel to 0: data arrives once, in order. A PDU that
		// repeats or skips bytes would otherwise count twice toward the
		// length and complete a read whose buffer still has holes.
		if n > 0 && off != t.got {
			return fmt.Errorf("%w: %s: Data-In at offset %d, expected %d (duplicate, overlapping or out-of-order data)", ErrProtocol, t.op, off, t.got)
		}
		if _, err := io.ReadFull(s.br, t.in[off:off+n]); err != nil {
			return err
		}
		if err := s.discard(pad4(n) - n); err != nil {
			return err
		}
		t.got += n
		if p.flags()&0x01 != 0 { // S: status in this PDU
			s.updateStatSN(p.statSN())
			s.finishRead(t, p.bhs[3], nil)
		}
		return nil
	case opSCSIResp:
		data, err := s.readData(n)
		if err != nil {
			return err
		}
		s.updateStatSN(p.statSN())
		t := s.lookup(p.itt())
		if t == nil {
			return nil
		}
		if p.bhs[2] != 0 {
			s.complete(t, fmt.Errorf("%s: iSCSI response %#x (target failure)", t.op, p.bhs[2]))
			return nil
		}
		s.finishRead(t, p.bhs[3], data)
		return nil
	case opNOPIn:
		data, err := s.readData(n)
		if err != nil {
			return err
		}
		if p.itt() != reservedTag {
			s.updateStatSN(p.statSN())
			s.mu.Lock()
			ch := s.pings[p.itt()]
			delete(s.pings, p.itt())
			s.mu.Unlock()
			if ch != nil {
				close(ch)
			}
		}
		if p.ttt() != reservedTag { // the target pings us: answer, immediate
			r := new(pdu)
			r.bhs[0] = opNOPOut | flagImmediate
			r.bhs[1] = flagFinal
			copy(r.bhs[8:16], p.bhs[8:16])
			put32(r.bhs[16:20], reservedTag)
			put32(r.bhs[20:24], p.ttt())
			r.data = data
			select {
			case s.nopReplies <- r:
			default:
				return fmt.Errorf("%w: target sent more than %d pings (NOP-In) we could not answer yet", ErrProtocol, maxPendingNOPReplies)
			}
		}
		return nil
	case opReject:
		data, err := s.readData(n)
		if err != nil {
			return err
		}
		if len(data) >= bhsLen {
			if t := s.lookup(binary.BigEndian.Uint32(data[16:20])); t != nil {
				s.complete(t, fmt.Errorf("%w: target rejected %s (reason %#x)", ErrProtocol, t.op, p.bhs[2]))
			}
		}
		return nil
	case opAsyncMsg:
		if _, err := s.readData(n); err != nil {
			return err
		}
		s.updateStatSN(p.statSN())
		switch p.bhs[36] {
		case 1, 2, 3: // logout requested, connection or session dropping
			return fmt.Errorf("target announced it is dropping the connection (async event %d)", p.bhs[36])
		}
		return nil
	case opLogoutResp:
		if _, err := s.readData(n); err != nil {
			return err
		}
		s.updateStatSN(p.statSN())
		close(s.logoutCh)
		return io.EOF
	case opR2T:
		if err := s.discard(n); err != nil {
			return err
		}
		if t := s.lookup(p.itt()); t != nil {
			s.complete(t, fmt.Errorf("%w: target asked for solicited data (R2T), which ferry does not send", ErrProtocol))
		}
		return nil
	case opTextResp:
		return s.discard(n)
	default:
		return fmt.Errorf("%w: unexpected opcode %#x from the target", ErrProtocol, p.opcode())
	}
}

func (s *session) finishRead(t *task, status byte, sense []byte) {
	switch {
	case status != statusGood:
		e := &SCSIError{Op: t.op, Status: status}
		parseSense(e, sense)
		s.complete(t, e)
	case t.in != nil && t.got != len(t.in) && t.op != "READ CAPACITY(16)":
		s.complete(t, fmt.Errorf("%w: %s returned %d of %d bytes", ErrProtocol, t.op, t.got, len(t.in)))
	default:
		s.complete(t, nil)
	}
}

func (s *session) readData(n int) ([]byte, error) {
	if n == 0 {
		return nil, nil
	}
	b := make([]byte, pad4(n))
	if _, err := io.ReadFull(s.br, b); err != nil {
		return nil, err
	}
	return b[:n], nil
}

func (s *session) discard(n int) error {
	if n <= 0 {
		return nil
	}
	_, err := s.br.Discard(n)
	return err
}

// ping sends a NOP-Out (immediate, as gotgt requires) that the target must answer.
func (s *session) ping() (chan struct{}, error) {
	s.mu.Lock()
	itt := s.allocITT()
	ch := make(chan struct{})
	s.pings[itt] = ch
	s.mu.Unlock()
	p := new(pdu)
	p.bhs[0] = opNOPOut | flagImmediate
	p.bhs[1] = flagFinal
	copy(p.bhs[8:16], s.lun[:])
	put32(p.bhs[16:20], itt)
	put32(p.bhs[20:24], reservedTag)
	return ch, s.sendImmediate(p)
}

// keepalive pings an idle connection and kills one that stays silent for
// the timeout, so a partitioned target is noticed even with nothing in flight.
func (s *session) keepalive() {
	interval := s.timeout / 3
	if interval < 200*time.Millisecond {
		interval = 200 * time.Millisecond
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-s.deadCh:
			return
		case <-tick.C:
		}
		silent := time.Since(time.Unix(0, s.lastRecv.Load()))
		if silent > s.timeout {
			s.kill(fmt.Errorf("%w: target silent for %s", errCmdTimeout, silent.Round(time.Millisecond)))
			return
		}
		if silent >= interval {
			if _, err := s.ping(); err != nil {
				s.kill(err)
				return
			}
		}
	}
}

// logout closes the session politely (RFC 7143 §11.14), bounded by timeout.
func (s *session) logout(timeout time.Duration) error {
	p := new(pdu)
	p.bhs[0] = opLogoutReq | flagImmediate
	p.bhs[1] = flagFinal // reason 0: close the session
	s.mu.Lock()
	put32(p.bhs[16:20], s.allocITT())
	s.mu.Unlock()
	err := s.sendImmediate(p)
	if err == nil {
		select {
		case <-s.logoutCh:
		case <-s.deadCh:
		case <-time.After(timeout):
			err = fmt.Errorf("%w: no logout response within %s", errCmdTimeout, timeout)
		}
	}
	s.kill(errors.New("logged out"))
	<-s.readerDone
	return err
}
