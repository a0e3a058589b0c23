package iscsi

import (
	"crypto/tls"
	"net"
	"testing"
	"time"
)

// A plain TCP client stands in for open-iscsi: through the tunnel it
// reaches the echo behind a TLS gate that admits the tunnel's certificate.
func TestTunnelCarriesPlainTCPOverMutualTLS(t *testing.T) {
	p := newWorkerPKI(t)
	gt, err := GateTLSFromDir(p.dir, "worker-a", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	gateAddr := startGate(t, gt)
	tun, err := StartTunnel(testLogger(t), "127.0.0.1:0", gateAddr, p.clientTo(t, p.dir, "worker-b", "worker-a"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tun.Close()
	c, err := net.DialTimeout("tcp", tun.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := roundTrip(c); err != nil {
		t.Fatalf("through the tunnel: %v", err)
	}
	// Close cuts live connections and stops listening.
	tun.Close()
	if err := roundTrip(c); err == nil {
		t.Error("a connection outlived its tunnel")
	}
	if c2, err := net.DialTimeout("tcp", tun.Addr(), time.Second); err == nil {
		c2.Close()
		t.Error("the tunnel still listens after Close")
	}
	tun.Close() // idempotent
}

func TestTunnelRefusesASourceWithAnotherCertificate(t *testing.T) {
	p := newWorkerPKI(t)
	// worker-c's gate admits worker-b, but the tunnel expects worker-a.
	gt, err := GateTLSFromDir(p.dir, "worker-c", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	tun, err := StartTunnel(testLogger(t), "127.0.0.1:0", startGate(t, gt), p.clientTo(t, p.dir, "worker-b", "worker-a"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tun.Close()
	c, err := net.DialTimeout("tcp", tun.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := roundTrip(c); err == nil {
		t.Fatal("the tunnel forwarded to an export that is not the source's")
	}
}

func TestTunnelListensOnLoopbackOnly(t *testing.T) {
	p := newWorkerPKI(t)
	cfg := p.clientTo(t, p.dir, "worker-b", "worker-a")
	for _, addr := range []string{"0.0.0.0:0", ":0", "10.0.0.1:3260", "localhost:0"} {
		if tun, err := StartTunnel(testLogger(t), addr, "127.0.0.1:1", cfg, nil); err == nil {
			tun.Close()
			t.Errorf("tunnel listened on %q", addr)
		}
	}
	if _, err := StartTunnel(testLogger(t), "127.0.0.1:0", "127.0.0.1:1", nil, nil); err == nil {
		t.Error("a tunnel without TLS started")
	}
}

// tamperProxy forwards TCP both ways and flips one bit in the stream from
// the server once handshake bytes have passed: an on-path writer.
func tamperProxy(t testing.TB, to string, after int) string {
	t.Helper()
	return serveTCP(t, func(c net.Conn) {
		s, err := net.Dial("tcp", to)
		if err != nil {
			return
		}
		defer s.Close()
		go func() { _, _ = copyBuf(s, c, -1) }()
		_, _ = copyBuf(c, s, after)
	})
}

// copyBuf copies src to dst, flipping a bit of the byte at offset flip (-1: none).
func copyBuf(dst, src net.Conn, flip int) (int, error) {
	buf := make([]byte, 32<<10)
	n := 0
	for {
		k, err := src.Read(buf)
		if k > 0 {
			if flip >= n && flip < n+k {
				buf[flip-n] ^= 0x01
			}
			n += k
			if _, werr := dst.Write(buf[:k]); werr != nil {
				return n, werr
			}
		}
		if err != nil {
			return n, err
		}
	}
}

// echoBig sends n bytes through c and returns what came back before the
// connection failed.
func echoBig(c net.Conn, n int) ([]byte, []byte, error) {
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := make([]byte, n)
	for i := range msg {
		msg[i] = byte(i * 7)
	}
	go func() { _, _ = c.Write(msg) }()
	got := make([]byte, 0, n)
	buf := make([]byte, 4096)
	for len(got) < n {
		k, err := c.Read(buf)
		got = append(got, buf[:k]...)
		if err != nil {
			return msg, got, err
		}
	}
	return msg, got, nil
}

// An on-path writer flipping one bit of the export's stream makes a
// connection error, never altered data: on the initiator's own TLS
// connection and through the kernel path's tunnel.
func TestTamperOnTheWireIsAConnectionError(t *testing.T) {
	p := newWorkerPKI(t)
	gt, err := GateTLSFromDir(p.dir, "worker-a", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	gateAddr := startGate(t, gt)
	const n, flipAt = 64 << 10, 40 << 10 // well past the handshake
	check := func(name string, c net.Conn) {
		t.Helper()
		msg, got, err := echoBig(c, n)
		if err == nil {
			t.Fatalf("%s: the tampered stream was delivered without an error", name)
		}
		for i := range got {
			if got[i] != msg[i] {
				t.Fatalf("%s: byte %d arrived altered instead of failing the connection", name, i)
			}
		}
	}

	direct, err := tls.Dial("tcp", tamperProxy(t, gateAddr, flipAt), p.clientTo(t, p.dir, "worker-b", "worker-a"))
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	check("initiator", direct)

	tun, err := StartTunnel(testLogger(t), "127.0.0.1:0", tamperProxy(t, gateAddr, flipAt), p.clientTo(t, p.dir, "worker-b", "worker-a"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tun.Close()
	c, err := net.DialTimeout("tcp", tun.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	check("tunnel", c)
}
