package nbdexport

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
)

// ioctls of linux/nbd.h: _IO(0xab, n).
const (
	nbdSetSock       = 0xab00
	nbdSetBlksize    = 0xab01
	nbdDoIt          = 0xab03
	nbdClearSock     = 0xab04
	nbdSetSizeBlocks = 0xab07
	nbdDisconnect    = 0xab08
	nbdSetTimeout    = 0xab09
	nbdSetFlags      = 0xab0a
)

// DefaultSendBuffer holds what the kernel can have outstanding on one
// connection: 128 requests (its queue depth per connection) of up to
// max_sectors_kb (1280 KiB by default) each, with room to spare. It bounds
// the kernel memory a stalled server can pin; nothing is allocated up front.
const DefaultSendBuffer = 256 << 20

// setSendBuffer sets fd's send buffer to n bytes, past the system's
// wmem_max where the process may (CAP_NET_ADMIN), and checks that it took.
func setSendBuffer(fd, n int) error {
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, n); err != nil {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, n); err != nil {
			return err
		}
	}
	got, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
	if err != nil {
		return err
	}
	// The kernel doubles what it is given (bookkeeping); wmem_max caps
	// SO_SNDBUF without the capability.
	if got < n {
		return fmt.Errorf("send buffer is %d bytes, want %d: run as root (CAP_NET_ADMIN) or raise net.core.wmem_max", got, n)
	}
	return nil
}

// Options configure an attachment.
type Options struct {
	// Connections the kernel spreads requests over (0: 2). Each has its own
	// socket pair and reader here.
	Connections int
	// BlockSize is the device's logical block size (0: 4096; 512 or 4096).
	BlockSize int64
	// Timeout after which the kernel fails a request the server has not
	// answered (0: 120 s). Longer than the clone's own bound on waiting
	// for its source, so the machine sees the clone's error, not a reset.
	Timeout time.Duration
	// ReadOnly exports the device read-only.
	ReadOnly bool
	// InFlight per connection (0: DefaultInFlight).
	InFlight int
	// SendBuffer is the send buffer of the kernel's end of each socket, in
	// bytes (0: DefaultSendBuffer; <0: the system's default, for tests).
	// The kernel writes requests into it from the task that submitted the
	// I/O; should the buffer fill, that task sleeps in the send, and a
	// signal there cuts the request short. Kernels before 6.13 ("nbd: fix
	// partial sending") may then resend it under another tag, leaving the
	// reply unmatched until the timeout. A buffer that holds every request
	// the kernel can have outstanding never makes a sender sleep.
	SendBuffer int
	// SysBlock is where block devices are listed (tests; "" is /sys/block).
	SysBlock string
}

// Export is a device attached to the kernel as /dev/nbdN.
type Export struct {
	log       zerolog.Logger
	blockSize int64
	dev       blockdev.Device
	path      string
	ctl       *os.File
	conns     []*fdConn
	doIt      chan error
	serve     sync.WaitGroup
	errs      []error
	emu       sync.Mutex
	once      sync.Once
	cerr      error
}

// Path is the block device, /dev/nbdN.
func (e *Export) Path() string { return e.path }

// Available reports whether the kernel has NBD devices (the nbd module
// loaded: /sys/block/nbd0 exists).
func Available() bool {
	_, err := os.Stat("/sys/block/nbd0")
	return err == nil
}

// Attach serves dev to the kernel on the first free /dev/nbdN and returns
// once the kernel has the device. The caller keeps dev; Close detaches
// and flushes it but does not close it.
func Attach(ctx context.Context, log zerolog.Logger, dev blockdev.Device, o Options) (*Export, error) {
	if o.Connections <= 0 {
		o.Connections = 2
	}
	if o.BlockSize == 0 {
		o.BlockSize = 4096
	}
	if o.BlockSize != 512 && o.BlockSize != 4096 {
		return nil, fmt.Errorf("nbd: block size %d: want 512 or 4096", o.BlockSize)
	}
	if o.Timeout <= 0 {
		o.Timeout = 120 * time.Second
	}
	if o.SendBuffer == 0 {
		o.SendBuffer = DefaultSendBuffer
	}
	if o.SysBlock == "" {
		o.SysBlock = "/sys/block"
	}
	size := dev.Size()
	if size <= 0 || size%o.BlockSize != 0 {
		return nil, fmt.Errorf("nbd: device size %d is not a positive multiple of the block size %d", size, o.BlockSize)
	}
	names, err := freeDevices(o.SysBlock)
	if err != nil {
		return nil, err
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("nbd: no free /dev/nbdN under %s: is the nbd module loaded (modprobe nbd nbds_max=16)?", o.SysBlock)
	}
	var lastErr error
	for _, name := range names {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		e, err := attachTo(ctx, log, "/dev/"+name, filepath.Join(o.SysBlock, name), dev, size, o)
		if err == nil {
			return e, nil
		}
		lastErr = err
		if !errors.Is(err, unix.EBUSY) {
			return nil, err
		}
		// Taken by someone else between the listing and our ioctl.
	}
	return nil, fmt.Errorf("nbd: every free device was taken meanwhile: %w", lastErr)
}

// freeDevices lists nbd devices with no server attached (no pid file),
// in numeric order.
func freeDevices(sysBlock string) ([]string, error) {
	ents, err := os.ReadDir(sysBlock)
	if err != nil {
		return nil, fmt.Errorf("nbd: listing block devices: %w", err)
	}
	var free []string
	for _, e := range ents {
		n := e.Name()
		num, ok := strings.CutPrefix(n, "nbd")
		if !ok {
			continue
		}
		if _, err := strconv.Atoi(num); err != nil {
			continue
		}
		if _, err := os.Stat(filepath.Join(sysBlock, n, "pid")); err == nil {
			continue
		}
		free = append(free, n)
	}
	slices.SortFunc(free, func(a, b string) int {
		x, _ := strconv.Atoi(a[3:])
		y, _ := strconv.Atoi(b[3:])
		return x - y
	})
	return free, nil
}

func ioctl(f *os.File, req, arg uintptr) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, arg)
	if errno != 0 {
		return errno
	}
	return nil
}

func attachTo(ctx context.Context, log zerolog.Logger, path, sys string, dev blockdev.Device, size int64, o Options) (*Export, error) {
	ctl, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("nbd: open %s: %w", path, err)
	}
	e := &Export{log: log.With().Str("nbd", path).Logger(), blockSize: o.BlockSize, dev: dev, path: path, ctl: ctl, doIt: make(chan error, 1)}
	var kernelFDs []int
	closeKernelFDs := func() {
		for _, fd := range kernelFDs {
			unix.Close(fd)
		}
		kernelFDs = nil
	}
	fail := func(what string, err error) (*Export, error) {
		closeKernelFDs()
		for _, c := range e.conns {
			c.release()
		}
		ctl.Close() // the last close resets a device that never started
		return nil, fmt.Errorf("nbd: %s on %s: %w", what, path, err)
	}
	for range o.Connections {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fail("socketpair", err)
		}
		kernelFDs = append(kernelFDs, fds[0])
		e.conns = append(e.conns, &fdConn{fd: fds[1]})
		if o.SendBuffer > 0 {
			if err := setSendBuffer(fds[0], o.SendBuffer); err != nil {
				return fail("size the kernel's send buffer", err)
			}
		}
	}
	steps := []struct {
		what     string
		req, arg uintptr
	}{
		{"set block size", nbdSetBlksize, uintptr(o.BlockSize)},
		{"set size", nbdSetSizeBlocks, uintptr(size / o.BlockSize)},
		{"set timeout", nbdSetTimeout, uintptr(o.Timeout / time.Second)},
		{"set flags", nbdSetFlags, uintptr(TransmissionFlags(o.ReadOnly))},
	}
	for _, fd := range kernelFDs {
		steps = append(steps, struct {
			what     string
			req, arg uintptr
		}{"hand a socket to the kernel", nbdSetSock, uintptr(fd)})
	}
	// No I/O scheduler: dm-crypt or the machine's filesystem above orders
	// the I/O, and without one a request keeps its tag when the kernel
	// requeues it (a partial send, see SendBuffer), so its reply still
	// matches. Before the device starts: its first reads (the partition
	// scan) go through whichever is set.
	if err := os.WriteFile(filepath.Join(sys, "queue", "scheduler"), []byte("none"), 0); err != nil {
		e.log.Warn().Err(err).Str("nbd", path).Msg("the device keeps its I/O scheduler")
	}
	setup := make(chan error, 1)
	go func() {
		// One thread for every ioctl, never given back to the runtime (it
		// ends with this goroutine): the kernel takes further sockets only
		// from the thread that handed it the first, and NBD_DO_IT waits
		// interruptibly, so a signal landing on its thread (SIGCHLD of any
		// command this process runs) would tear the device down. Every
		// signal is blocked here; the process's other threads take them.
		runtime.LockOSThread()
		var all unix.Sigset_t
		for i := range all.Val {
			all.Val[i] = ^uint64(0)
		}
		if err := unix.PthreadSigmask(unix.SIG_BLOCK, &all, nil); err != nil {
			setup <- fmt.Errorf("blocking signals on the device's thread: %w", err)
			return
		}
		for _, s := range steps {
			if err := ioctl(ctl, s.req, s.arg); err != nil {
				_ = ioctl(ctl, nbdClearSock, 0)
				setup <- fmt.Errorf("%s: %w", s.what, err)
				return
			}
		}
		setup <- nil
		// NBD_DO_IT blocks until the device is disconnected.
		e.doIt <- ioctl(ctl, nbdDoIt, 0)
	}()
	if err := <-setup; err != nil {
		return fail("setting up the device", err)
	}
	closeKernelFDs() // the kernel holds its own references now
	srv := &Server{Log: e.log, Dev: dev, ReadOnly: o.ReadOnly, InFlight: o.InFlight}
	for _, c := range e.conns {
		e.serve.Add(1)
		go func() {
			defer e.serve.Done()
			if err := srv.Serve(c); err != nil {
				e.emu.Lock()
				e.errs = append(e.errs, err)
				e.emu.Unlock()
			}
		}()
	}
	// The kernel publishes the serving pid when the device starts and sets
	// its capacity just after: ready is both.
	live := func() bool {
		if _, err := os.Stat(filepath.Join(sys, "pid")); err != nil {
			return false
		}
		b, err := os.ReadFile(filepath.Join(sys, "size"))
		return err == nil && strings.TrimSpace(string(b)) == strconv.FormatInt(size/512, 10)
	}
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for {
		if live() {
			e.log.Info().Int64("bytes", size).Int("connections", o.Connections).Msg("nbd device attached")
			return e, nil
		}
		select {
		case err := <-e.doIt:
			e.doIt <- err
			e.Close()
			if err == nil {
				err = errors.New("returned at once")
			}
			return nil, fmt.Errorf("nbd: starting %s: %w", path, err)
		case <-deadline.C:
			e.Close()
			return nil, fmt.Errorf("nbd: %s did not come up within 10 s", path)
		case <-ctx.Done():
			e.Close()
			return nil, ctx.Err()
		case <-tick.C:
		}
	}
}

// Close disconnects the device from the kernel (it fails what is still
// queued), waits for the servers to finish the requests they hold,
// and flushes the device. Idempotent.
func (e *Export) Close() error {
	e.once.Do(func() {
		if err := ioctl(e.ctl, nbdDisconnect, 0); err != nil && !errors.Is(err, unix.EINVAL) {
			e.log.Warn().Err(err).Msg("nbd disconnect")
		}
		select {
		case <-e.doIt:
		case <-time.After(30 * time.Second):
			e.log.Warn().Msg("nbd: the kernel did not let the device go within 30 s; closing its sockets")
		}
		for _, c := range e.conns {
			c.Close()
		}
		e.serve.Wait()
		for _, c := range e.conns {
			c.release()
		}
		_ = ioctl(e.ctl, nbdClearSock, 0)
		e.ctl.Close()
		e.emu.Lock()
		if err := e.dev.Flush(); err != nil {
			e.errs = append(e.errs, fmt.Errorf("nbd: flushing the device after detach: %w", err))
		}
		e.cerr = errors.Join(e.errs...)
		e.emu.Unlock()
	})
	return e.cerr
}

// Release frees an NBD device whose server died (its process killed):
// the kernel drops the dead sockets and the device is free again.
func Release(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("nbd: open %s: %w", path, err)
	}
	defer f.Close()
	if err := ioctl(f, nbdDisconnect, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("nbd: disconnect %s: %w", path, err)
	}
	if err := ioctl(f, nbdClearSock, 0); err != nil {
		return fmt.Errorf("nbd: clear %s: %w", path, err)
	}
	return nil
}

// Grow tells the kernel the device is now size bytes; the served device
// grew first (the kernel may read the new end at once).
func (e *Export) Grow(size int64) error {
	if size <= 0 || size%e.blockSize != 0 {
		return fmt.Errorf("nbd: grow %s to %d bytes: want a positive multiple of %d", e.path, size, e.blockSize)
	}
	if size > e.dev.Size() {
		return fmt.Errorf("nbd: grow %s to %d bytes: the device below has only %d", e.path, size, e.dev.Size())
	}
	if err := ioctl(e.ctl, nbdSetSizeBlocks, uintptr(size/e.blockSize)); err != nil {
		return fmt.Errorf("nbd: grow %s to %d bytes: %w", e.path, size, err)
	}
	return nil
}
