package nbdexport

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
)

// countingDev counts flushes and can hold reads back, to show that
// requests run concurrently and replies are matched by cookie.
type countingDev struct {
	blockdev.Device
	flushes atomic.Int64
	gate    chan struct{} // when set, a read at offset 0 waits for it
}

func (d *countingDev) Flush() error { d.flushes.Add(1); return d.Device.Flush() }

func (d *countingDev) ReadAt(p []byte, off int64) (int, error) {
	if d.gate != nil && off == 0 {
		<-d.gate
	}
	return d.Device.ReadAt(p, off)
}

// client is the kernel's side of one connection, as a test speaks it.
type client struct {
	t *testing.T
	c net.Conn
}

func serve(t *testing.T, dev blockdev.Device, readOnly bool) (*client, <-chan error) {
	t.Helper()
	a, b := socketPair(t)
	s := &Server{Log: zerolog.Nop(), Dev: dev, ReadOnly: readOnly}
	done := make(chan error, 1)
	go func() { done <- s.Serve(b) }()
	t.Cleanup(func() { a.Close() })
	return &client{t, a}, done
}

// socketPair is what Attach hands the kernel and the server: a connected
// AF_UNIX stream pair (buffered, unlike net.Pipe).
func socketPair(t testing.TB) (net.Conn, net.Conn) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var cs [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "pair")
		cs[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	return cs[0], cs[1]
}

func (c *client) send(r Request, payload []byte) {
	c.t.Helper()
	c.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.c.Write(append(r.Marshal(), payload...)); err != nil {
		c.t.Fatalf("sending request %+v: %v", r, err)
	}
}

// recv reads one reply, with n bytes of data when it succeeded and n > 0.
func (c *client) recv(n int) (cookie uint64, errno syscall.Errno, data []byte) {
	c.t.Helper()
	h := make([]byte, replyLen)
	if _, err := io.ReadFull(c.c, h); err != nil {
		c.t.Fatalf("reading a reply: %v", err)
	}
	if m := binary.BigEndian.Uint32(h); m != replyMagic {
		c.t.Fatalf("reply magic %#x", m)
	}
	errno = syscall.Errno(binary.BigEndian.Uint32(h[4:]))
	cookie = binary.BigEndian.Uint64(h[8:])
	if errno == 0 && n > 0 {
		data = make([]byte, n)
		if _, err := io.ReadFull(c.c, data); err != nil {
			c.t.Fatalf("reading %d bytes of data: %v", n, err)
		}
	}
	return cookie, errno, data
}

func TestServeReadWriteFlushTrimZeroes(t *testing.T) {
	mem := blockdev.NewMem(1 << 20)
	dev := &countingDev{Device: mem}
	// The server's end as Attach makes it: blocking calls on the socket.
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "kernel")
	kc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kc.Close() })
	ours := &fdConn{fd: fds[1]}
	done := make(chan error, 1)
	go func() { done <- (&Server{Log: zerolog.Nop(), Dev: dev}).Serve(ours) }()
	t.Cleanup(func() { ours.release() })
	c := &client{t, kc}

	data := make([]byte, 64<<10)
	rand.Read(data)
	c.send(Request{Type: cmdWrite, Cookie: 1, Offset: 4096, Length: uint32(len(data))}, data)
	if ck, e, _ := c.recv(0); ck != 1 || e != 0 {
		t.Fatalf("write: cookie %d errno %v", ck, e)
	}
	c.send(Request{Type: cmdRead, Cookie: 2, Offset: 4096, Length: uint32(len(data))}, nil)
	if ck, e, got := c.recv(len(data)); ck != 2 || e != 0 || !bytes.Equal(got, data) {
		t.Fatalf("read back: cookie %d errno %v equal %v", ck, e, bytes.Equal(got, data))
	}
	c.send(Request{Type: cmdFlush, Cookie: 3}, nil)
	if _, e, _ := c.recv(0); e != 0 || dev.flushes.Load() != 1 {
		t.Fatalf("flush: errno %v, %d flushes", e, dev.flushes.Load())
	}
	// FUA: the write is flushed before it is acknowledged.
	c.send(Request{Type: cmdWrite, Flags: cmdFlagFUA, Cookie: 4, Offset: 0, Length: 4096}, data[:4096])
	if _, e, _ := c.recv(0); e != 0 || dev.flushes.Load() != 2 {
		t.Fatalf("FUA write: errno %v, %d flushes", e, dev.flushes.Load())
	}
	c.send(Request{Type: cmdTrim, Cookie: 5, Offset: 4096, Length: 8192}, nil)
	c.send(Request{Type: cmdWriteZeroes, Cookie: 6, Offset: 16384, Length: 4096}, nil)
	for range 2 {
		if ck, e, _ := c.recv(0); e != 0 {
			t.Fatalf("request %d: errno %v", ck, e)
		}
	}
	got := make([]byte, 16384)
	mem.ReadAt(got, 4096)
	if !bytes.Equal(got[:8192], make([]byte, 8192)) || !bytes.Equal(got[12288:], make([]byte, 4096)) || !bytes.Equal(got[8192:12288], data[8192:12288]) {
		t.Fatal("trim or write-zeroes changed the wrong bytes")
	}
	c.send(Request{Type: cmdDisc, Cookie: 7}, nil)
	if err := <-done; err != nil {
		t.Fatalf("disconnect: %v", err)
	}

	// fstrim's discards are as large as the free space: no cap but the device.
	big := blockdev.NewMem(MaxRequest * 3)
	c, _ = serve(t, big, false)
	c.send(Request{Type: cmdTrim, Cookie: 8, Length: MaxRequest * 2}, nil)
	if _, e, _ := c.recv(0); e != 0 {
		t.Fatalf("a %d-byte trim: errno %v", MaxRequest*2, e)
	}
}

// Replies come as requests complete, each with its request's cookie: a
// slow read does not hold back the ones after it.
func TestServeConcurrentRepliesByCookie(t *testing.T) {
	mem := blockdev.NewMem(1 << 20)
	want := make([]byte, 1<<20)
	rand.Read(want)
	mem.WriteAt(want, 0)
	dev := &countingDev{Device: mem, gate: make(chan struct{})}
	c, _ := serve(t, dev, false)
	c.send(Request{Type: cmdRead, Cookie: 100, Offset: 0, Length: 4096}, nil) // held
	for i := uint64(1); i <= 8; i++ {
		c.send(Request{Type: cmdRead, Cookie: i, Offset: i * 4096, Length: 4096}, nil)
	}
	var seen []uint64
	for range 8 {
		ck, e, got := c.recv(4096)
		if e != 0 || !bytes.Equal(got, want[ck*4096:(ck+1)*4096]) {
			t.Fatalf("reply %d: errno %v or wrong data", ck, e)
		}
		seen = append(seen, ck)
	}
	slices.Sort(seen)
	if !slices.Equal(seen, []uint64{1, 2, 3, 4, 5, 6, 7, 8}) {
		t.Fatalf("replies %v", seen)
	}
	close(dev.gate)
	if ck, e, got := c.recv(4096); ck != 100 || e != 0 || !bytes.Equal(got, want[:4096]) {
		t.Fatalf("held read: cookie %d errno %v", ck, e)
	}
}

// Refused requests get an errno, change nothing, and the connection goes
// on (a refused write's payload is consumed, not read as the next header).
func TestServeRefusesAndChangesNothing(t *testing.T) {
	mem := blockdev.NewMem(64 << 10)
	orig := make([]byte, 64<<10)
	rand.Read(orig)
	mem.WriteAt(orig, 0)
	c, _ := serve(t, mem, false)
	cases := []struct {
		r    Request
		want syscall.Errno
	}{
		{Request{Type: cmdWrite, Cookie: 1, Offset: 60 << 10, Length: 8192}, syscall.EINVAL}, // crosses the end
		{Request{Type: cmdRead, Cookie: 2, Offset: 1 << 62, Length: 4096}, syscall.EINVAL},
		{Request{Type: cmdTrim, Cookie: 3, Offset: ^uint64(0) - 10, Length: 4096}, syscall.EINVAL}, // overflow
		{Request{Type: 5, Cookie: 4}, syscall.EINVAL},                                              // unknown
		{Request{Type: cmdRead, Cookie: 5, Length: MaxRequest + 1}, syscall.EINVAL},
	}
	for _, tc := range cases {
		var payload []byte
		if tc.r.Type == cmdWrite {
			payload = bytes.Repeat([]byte{0xee}, int(tc.r.Length))
		}
		c.send(tc.r, payload)
		if ck, e, _ := c.recv(0); ck != tc.r.Cookie || e != tc.want {
			t.Fatalf("%+v: cookie %d errno %v, want %v", tc.r, ck, e, tc.want)
		}
	}
	c.send(Request{Type: cmdRead, Cookie: 9, Length: 4096}, nil)
	if _, e, got := c.recv(4096); e != 0 || !bytes.Equal(got, orig[:4096]) {
		t.Fatalf("after refusals: errno %v", e)
	}
	got := make([]byte, len(orig))
	mem.ReadAt(got, 0)
	if !bytes.Equal(got, orig) {
		t.Fatal("a refused request changed the device")
	}

	ro, _ := serve(t, mem, true)
	for i, r := range []Request{{Type: cmdWrite, Length: 4096}, {Type: cmdTrim, Length: 4096}, {Type: cmdWriteZeroes, Length: 4096}} {
		r.Cookie = uint64(i)
		var payload []byte
		if r.Type == cmdWrite {
			payload = make([]byte, 4096)
		}
		ro.send(r, payload)
		if _, e, _ := ro.recv(0); e != syscall.EPERM {
			t.Fatalf("read-only %+v: errno %v, want EPERM", r, e)
		}
	}
	mem.ReadAt(got, 0)
	if !bytes.Equal(got, orig) {
		t.Fatal("a read-only export changed the device")
	}
}

// What breaks the framing ends the connection at once, touching nothing.
func TestServeClosesOnFramingErrors(t *testing.T) {
	for name, raw := range map[string][]byte{
		"bad magic":  append([]byte{0xde, 0xad, 0xbe, 0xef}, make([]byte, requestLen-4)...),
		"huge write": Request{Type: cmdWrite, Length: MaxRequest + 1}.Marshal(),
	} {
		t.Run(name, func(t *testing.T) {
			mem := blockdev.NewMem(4096)
			c, done := serve(t, mem, false)
			c.c.Write(raw)
			select {
			case err := <-done:
				if err == nil {
					t.Fatal("Serve returned nil on a framing error")
				}
			case <-time.After(5 * time.Second):
				t.Fatal("connection still served")
			}
		})
	}
}

func TestFreeDevices(t *testing.T) {
	sys := t.TempDir()
	for _, d := range []string{"nbd10", "nbd2", "nbd0", "nbdx", "loop0", "nbd1"} {
		os.MkdirAll(filepath.Join(sys, d), 0o755)
	}
	os.WriteFile(filepath.Join(sys, "nbd0", "pid"), []byte("1\n"), 0o644) // in use
	got, err := freeDevices(sys)
	if err != nil || !slices.Equal(got, []string{"nbd1", "nbd2", "nbd10"}) {
		t.Fatalf("free %v %v", got, err)
	}
}

// FuzzServe feeds arbitrary request streams to a server: it must never
// panic, never change the device outside what a valid request covers
// (here: never at all, because writes carry a poisoned marker checked
// below only through valid requests), and always return.
func FuzzServe(f *testing.F) {
	f.Add(Request{Type: cmdRead, Length: 4096}.Marshal())
	f.Add(append(Request{Type: cmdWrite, Offset: 4096, Length: 8}.Marshal(), "ABCDEFGH"...))
	f.Add(Request{Type: cmdTrim, Offset: 1 << 40, Length: 1}.Marshal())
	f.Add(Request{Type: cmdWrite, Length: 1 << 31}.Marshal())
	f.Add(append(Request{Type: cmdFlush}.Marshal(), Request{Type: cmdDisc}.Marshal()...))
	f.Fuzz(fuzzOne)
}

func fuzzOne(t *testing.T, stream []byte) {
	{
		const size = 64 << 10
		mem := blockdev.NewMem(size)
		a, b := socketPair(t)
		s := &Server{Log: zerolog.Nop(), Dev: mem, InFlight: 4}
		done := make(chan error, 1)
		go func() { done <- s.Serve(b) }()
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); io.Copy(io.Discard, a) }() // drain replies
		a.SetDeadline(time.Now().Add(5 * time.Second))
		a.Write(stream)
		a.(*net.UnixConn).CloseWrite()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("Serve did not return after the stream ended")
		}
		wg.Wait()
		a.Close()
		// Every valid write in the stream lies inside the device: the
		// device never grew.
		if mem.Size() != size {
			t.Fatalf("device size %d", mem.Size())
		}
		// Check agrees with ParseRequest: an accepted request is in range.
		for i := 0; i+requestLen <= len(stream); i += requestLen {
			r, err := ParseRequest(stream[i : i+requestLen])
			if err != nil {
				continue
			}
			if r.Check(size, false) == 0 && r.Type != cmdFlush && r.Offset+uint64(r.Length) > size {
				t.Fatalf("%+v accepted beyond the device", r)
			}
		}
	}
}
