package iscsi

import (
	"bytes"
	"context"
	"errors"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// A hostile target (the source of a migration) speaking to ferry's
// initiator over a pipe: the session under test is in full feature phase.

func pipeSession(t *testing.T, timeout time.Duration) (*session, net.Conn) {
	t.Helper()
	ours, theirs := net.Pipe()
	s := newSession(zerolog.Nop(), ours, loginParams{targetMaxRecv: 8192, expCmdSN: 1, maxCmdSN: 64}, 0, timeout)
	t.Cleanup(func() {
		s.kill(errors.New("test over"))
		theirs.Close()
		<-s.readerDone
	})
	return s, theirs
}

func nopIn(ttt uint32, data []byte) []byte {
	p := new(pdu)
	p.bhs[0], p.bhs[1] = opNOPIn, flagFinal
	put32(p.bhs[16:20], reservedTag) // not an answer to one of our pings
	put32(p.bhs[20:24], ttt)         // the target asks for an answer
	put32(p.bhs[28:32], 1)
	put32(p.bhs[32:36], 1)
	put32(p.bhs[36:40], 64)
	p.data = data
	return p.marshal()
}

// TestNOPInAnsweredByOneResponder: a target pinging without reading our
// answers used to get one goroutine per NOP-In, each blocked on the write;
// now one responder answers in order and a flood ends the session.
func TestNOPInAnsweredByOneResponder(t *testing.T) {
	t.Run("answers", func(t *testing.T) {
		_, target := pipeSession(t, 5*time.Second)
		go target.Write(nopIn(0x1234, []byte("ping")))
		_ = target.SetReadDeadline(time.Now().Add(5 * time.Second))
		r, err := readPDU(target, maxDataSegment)
		if err != nil {
			t.Fatal(err)
		}
		if r.opcode() != opNOPOut || r.ttt() != 0x1234 || r.itt() != reservedTag || string(r.data) != "ping" {
			t.Fatalf("answer: opcode %#x itt %#x ttt %#x data %q", r.opcode(), r.itt(), r.ttt(), r.data)
		}
	})
	t.Run("flood", func(t *testing.T) {
		before := runtime.NumGoroutine()
		s, target := pipeSession(t, 30*time.Second)
		const pings = 2000
		sent := 0
		for ; sent < pings; sent++ {
			_ = target.SetWriteDeadline(time.Now().Add(2 * time.Second))
			if _, err := target.Write(nopIn(uint32(sent), make([]byte, 512))); err != nil {
				break // the initiator hung up: what we want
			}
		}
		if grown := runtime.NumGoroutine() - before; grown > 20 {
			t.Fatalf("%d pings (nothing read back) left %d more goroutines", sent, grown)
		}
		select {
		case <-s.deadCh:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d unanswerable pings and the session is still up", sent)
		}
		if err := s.deadErr(); !errors.Is(err, ErrProtocol) {
			t.Fatalf("session ended with %v, want a protocol error", err)
		}
	})
}

func dataIn(itt uint32, off int, data []byte, final bool) []byte {
	p := new(pdu)
	p.bhs[0] = opDataIn
	if final {
		p.bhs[1] = flagFinal | 0x01 // F and S: status good in this PDU
	}
	put32(p.bhs[16:20], itt)
	put32(p.bhs[24:28], reservedTag)
	put32(p.bhs[28:32], 1) // StatSN
	put32(p.bhs[32:36], 2)
	put32(p.bhs[36:40], 64)
	put32(p.bhs[40:44], uint32(off))
	p.data = data
	return p.marshal()
}

// TestDataInCountedOnce: the same bytes sent twice must not make up for
// bytes never sent.
func TestDataInCountedOnce(t *testing.T) {
	for name, tc := range map[string]struct {
		pdus    func(itt uint32) [][]byte
		wantErr bool
	}{
		"in order": {func(itt uint32) [][]byte {
			return [][]byte{dataIn(itt, 0, bytes.Repeat([]byte{1}, 512), false), dataIn(itt, 512, bytes.Repeat([]byte{2}, 512), true)}
		}, false},
		"duplicate": {func(itt uint32) [][]byte {
			return [][]byte{dataIn(itt, 0, bytes.Repeat([]byte{1}, 512), false), dataIn(itt, 0, bytes.Repeat([]byte{1}, 512), true)}
		}, true},
		"overlap": {func(itt uint32) [][]byte {
			return [][]byte{dataIn(itt, 0, bytes.Repeat([]byte{1}, 768), false), dataIn(itt, 256, bytes.Repeat([]byte{1}, 768), true)}
		}, true},
		"gap then fill twice": {func(itt uint32) [][]byte {
			return [][]byte{dataIn(itt, 512, bytes.Repeat([]byte{2}, 512), false), dataIn(itt, 512, bytes.Repeat([]byte{2}, 512), true)}
		}, true},
	} {
		t.Run(name, func(t *testing.T) {
			s, target := pipeSession(t, 5*time.Second)
			tk := newTask("READ(16)", cdbRead16(0, 2), make([]byte, 1024))
			done := make(chan error, 1)
			go func() { done <- s.exec(context.Background(), tk, time.Now().Add(5*time.Second)) }()
			_ = target.SetDeadline(time.Now().Add(5 * time.Second))
			cmd, err := readPDU(target, maxDataSegment)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range tc.pdus(cmd.itt()) {
				if _, err := target.Write(p); err != nil {
					break // the initiator already hung up
				}
			}
			err = <-done
			if tc.wantErr {
				if err == nil {
					t.Fatalf("read completed with %d bytes counted; buffer %v…", tk.got, tk.in[500:524])
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(tk.in, append(bytes.Repeat([]byte{1}, 512), bytes.Repeat([]byte{2}, 512)...)) {
				t.Fatal("wrong data")
			}
		})
	}
}
