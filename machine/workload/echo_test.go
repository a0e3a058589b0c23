package workload

import (
	"bufio"
	"io"
	"net"
	"testing"
	"time"
)

func TestServeEcho(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { ServeEcho(ln); close(done) }()
	for _, msg := range []string{"ping\n", "second connection\n"} {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		got, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil || got != msg {
			t.Fatalf("echo of %q = %q, %v", msg, got, err)
		}
	}
	ln.Close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("ServeEcho did not return after its listener closed")
	}
}

func TestServeEchoWho(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go ServeEchoWho(ln, "w1")
	ask := func(msg string) string {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, msg)
		b := make([]byte, 64)
		n, _ := io.ReadAtLeast(c, b, 1)
		return string(b[:n])
	}
	if got := ask(WhoQuestion); got != "w1\n" {
		t.Fatalf("who? answered %q, want w1", got)
	}
	if got := ask("hello\n"); got != "hello\n" {
		t.Fatalf("echo answered %q", got)
	}
}
