package server

import (
	"net"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/ferry-dev/ferry/internal/tlsutil"
)

// A peer that opens a TCP connection to the raft port and never speaks TLS
// is dropped after the handshake deadline; a real peer's connection works
// and keeps no deadline afterwards.
func TestRaftStreamHandshakeDeadline(t *testing.T) {
	dir := t.TempDir()
	if err := tlsutil.EnsureDev(dir, tlsutil.Cert{Name: "s1", Kind: tlsutil.KindServer, Hosts: []string{"127.0.0.1"}}); err != nil {
		t.Fatal(err)
	}
	srvTLS, err := tlsutil.ServerConfig(dir, "s1")
	if err != nil {
		t.Fatal(err)
	}
	cliTLS, err := tlsutil.ClientConfig(dir, "s1")
	if err != nil {
		t.Fatal(err)
	}
	old := raftHandshakeTimeout
	raftHandshakeTimeout = time.Second // a real handshake under -race on a loaded host fits
	defer func() { raftHandshakeTimeout = old }()

	sl, err := newStreamLayer("127.0.0.1:0", srvTLS, cliTLS)
	if err != nil {
		t.Fatal(err)
	}
	defer sl.Close()

	silent, err := net.Dial("tcp", sl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	c, err := sl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("read from a peer that never did TLS succeeded")
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("silent peer held for %v, want about the 1s handshake deadline", el)
	}

	// A real peer: handshake, then stay idle past the deadline and still talk.
	done := make(chan error, 1)
	go func() {
		pc, err := sl.Dial(raft.ServerAddress(sl.Addr().String()), 5*time.Second)
		if err != nil {
			done <- err
			return
		}
		defer pc.Close()
		if _, err := pc.Write([]byte("x")); err != nil {
			done <- err
			return
		}
		time.Sleep(1500 * time.Millisecond)
		_, err = pc.Write([]byte("y"))
		done <- err
	}()
	c2, err := sl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	buf := make([]byte, 2)
	for got := 0; got < 2; {
		n, err := c2.Read(buf[got:])
		if err != nil {
			t.Fatalf("read from an authenticated peer after idling: %v", err)
		}
		got += n
	}
	if string(buf) != "xy" {
		t.Fatalf("read %q, want xy", buf)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
