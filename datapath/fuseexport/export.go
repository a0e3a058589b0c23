// Package fuseexport serves a blockdev.Device as one regular file in a FUSE
// mount, so the kernel can attach it to a loop device (losetup
// --direct-io=on) and run a real filesystem on it. fstrim on that
// filesystem arrives here as fallocate(PUNCH_HOLE|KEEP_SIZE) and becomes
// Discard; fsync becomes Flush.
//
// Tear-down order: detach the loop device, then Close (unmount). If the
// serving process dies, the kernel aborts the FUSE connection and every
// pending and later request fails (the loop device returns EIO) instead of
// hanging.
package fuseexport

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/internal/logging"
)

// BlockSize is what Statfs reports; filesystems on the loop device use it
// for discard granularity.
const BlockSize = 4096

// Export is one mounted FUSE file serving a device.
type Export struct {
	log    zerolog.Logger
	dir    string
	name   string
	server *fuse.Server
	node   *fileNode
	mu     sync.Mutex
	closed bool
}

// Mount serves dev as dir/fileName. dir is created if missing. The export
// does not own dev: closing the export leaves it open.
func Mount(log zerolog.Logger, dir, fileName string, dev blockdev.Device) (*Export, error) {
	if fileName == "" || filepath.Base(fileName) != fileName || fileName == "." || fileName == ".." {
		return nil, fmt.Errorf("export file name %q: must be a plain file name", fileName)
	}
	if dev == nil {
		return nil, errors.New("export needs a device")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("mount directory %s: %w", dir, err)
	}
	if _, err := os.Stat(abs); errors.Is(err, syscall.ENOTCONN) {
		return nil, fmt.Errorf("%s is the mount of a FUSE server that died: run CleanupStale on it first: %w", abs, err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("create mount directory %s: %w", abs, err)
	}
	log = logging.For(log, "fuseexport").With().Str("dir", abs).Logger()
	node := &fileNode{log: log, dev: dev}
	node.size.Store(dev.Size())
	root := &rootNode{}
	long := time.Hour
	opts := &fs.Options{
		EntryTimeout: &long,
		AttrTimeout:  &long,
		OnAdd: func(ctx context.Context) {
			ch := root.NewPersistentInode(ctx, node, fs.StableAttr{Mode: syscall.S_IFREG, Ino: 2})
			root.AddChild(fileName, ch, false)
		},
		MountOptions: fuse.MountOptions{
			FsName:        "ferry:" + fileName,
			Name:          "ferry",
			DirectMount:   true, // as root, mount(2) directly: no fusermount needed
			MaxWrite:      1 << 20,
			MaxBackground: 64,
			DisableXAttrs: true,
			DisableSplice: true, // reads return plain buffers; splice only logs about 1 MiB pipes
			// Without ASYNC_DIO the kernel serves a direct-I/O kiocb
			// synchronously, so the loop device's worker waits on each
			// request in turn: queue depth 1 whatever the filesystem above
			// asks. With it, up to MaxBackground requests are in flight.
			ExtraCapabilities: fuse.CAP_ASYNC_DIO,
		},
	}
	server, err := fs.Mount(abs, root, opts)
	if err != nil {
		return nil, fmt.Errorf("mount FUSE export at %s (needs root and /dev/fuse): %w", abs, err)
	}
	e := &Export{log: log, dir: abs, name: fileName, server: server, node: node}
	log.Info().Str("file", e.Path()).Int64("size", node.size.Load()).Msg("exported")
	return e, nil
}

// Path is the exported file, the one to attach to a loop device.
func (e *Export) Path() string { return filepath.Join(e.dir, e.name) }

// Swap replaces the served device without the kernel noticing: requests in
// flight finish on the old device, later ones go to the new. The new device
// must be at least as large (the export keeps its size). It returns the old
// device, which the caller still owns.
func (e *Export) Swap(dev blockdev.Device) (blockdev.Device, error) {
	if dev == nil {
		return nil, errors.New("swap needs a device")
	}
	n := e.node
	if dev.Size() < n.size.Load() {
		return nil, fmt.Errorf("swap: new device is %d bytes, smaller than the %d the export serves", dev.Size(), n.size.Load())
	}
	n.mu.Lock()
	old := n.dev
	n.dev = dev
	n.mu.Unlock()
	e.log.Info().Msg("backing device swapped")
	return old, nil
}

// Grow makes the exported file size bytes long once the device serves that
// many, and tells the kernel to drop the size it cached: the next stat of
// the file (losetup --set-capacity does one) sees the new size.
func (e *Export) Grow(size int64) error {
	n := e.node
	n.mu.Lock()
	defer n.mu.Unlock()
	switch cur := n.size.Load(); {
	case size < cur:
		return fmt.Errorf("grow export to %d bytes: it serves %d; an export never shrinks", size, cur)
	case size > n.dev.Size():
		return fmt.Errorf("grow export to %d bytes: the device serves only %d", size, n.dev.Size())
	case size == cur:
		return nil
	}
	n.size.Store(size)
	// A negative offset invalidates the attributes only, not the pages.
	if errno := n.NotifyContent(-1, 0); errno != 0 && errno != syscall.ENOENT {
		return fmt.Errorf("tell the kernel %s grew to %d bytes: %w", e.Path(), size, errno)
	}
	e.log.Info().Int64("size", size).Msg("export grew")
	return nil
}

// Close unmounts the export. It refuses while a loop device still uses the
// file (detach it first), because unmounting under a loop device would turn
// every I/O of the filesystem above into an error.
func (e *Export) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil
	}
	loops, err := loopdev.FindByBackingFile(e.Path())
	if err != nil && !errors.Is(err, loopdev.ErrNoLosetup) {
		return fmt.Errorf("check loop devices on %s before unmounting: %w", e.Path(), err)
	}
	if len(loops) > 0 {
		return fmt.Errorf("%s is still attached to %v: detach the loop device first (losetup -d)", e.Path(), loops)
	}
	if err := e.server.Unmount(); err != nil {
		return fmt.Errorf("unmount %s: %w", e.dir, err)
	}
	e.server.Wait()
	e.closed = true
	e.log.Info().Msg("unmounted")
	return nil
}

// CleanupStale tears down what a crashed server left at dir: it detaches
// loop devices still attached to dir/fileName (their I/O already fails) and
// lazily unmounts the dead FUSE mount, so Mount can use dir again. It
// returns the loop devices it detached. A healthy mount is left alone.
func CleanupStale(dir, fileName string) ([]string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(abs); !errors.Is(err, syscall.ENOTCONN) {
		return nil, nil // not a dead FUSE mount
	}
	loops, err := loopdev.FindByBackingFile(filepath.Join(abs, fileName))
	if err != nil {
		return nil, fmt.Errorf("find loop devices on the dead export %s: %w", abs, err)
	}
	var detached []string
	for _, l := range loops {
		if err := loopdev.Detach(l); err != nil {
			return detached, fmt.Errorf("detach %s from the dead export (unmount its filesystem first): %w", l, err)
		}
		detached = append(detached, l)
	}
	if err := unix.Unmount(abs, unix.MNT_DETACH); err != nil {
		return detached, fmt.Errorf("unmount the dead export %s: %w", abs, err)
	}
	return detached, nil
}

type rootNode struct{ fs.Inode }

var _ fs.NodeStatfser = (*rootNode)(nil)

func (r *rootNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	out.Bsize, out.Frsize, out.NameLen = BlockSize, BlockSize, 255
	return 0
}

// fileNode is the exported file. mu is held shared by every request and
// exclusively by Swap.
type fileNode struct {
	fs.Inode
	log  zerolog.Logger
	mu   sync.RWMutex
	dev  blockdev.Device
	size atomic.Int64 // only grows (Export.Grow)
}

var (
	_ fs.NodeOpener    = (*fileNode)(nil)
	_ fs.NodeReader    = (*fileNode)(nil)
	_ fs.NodeWriter    = (*fileNode)(nil)
	_ fs.NodeGetattrer = (*fileNode)(nil)
	_ fs.NodeSetattrer = (*fileNode)(nil)
	_ fs.NodeFlusher   = (*fileNode)(nil)
	_ fs.NodeFsyncer   = (*fileNode)(nil)
	_ fs.NodeAllocater = (*fileNode)(nil)
	_ fs.NodeStatfser  = (*fileNode)(nil)
)

// Open serves every handle with direct I/O: the device is the only cache,
// so nothing is stale after a Swap and nothing is cached twice. Parallel
// direct writes let the kernel send writes to one file concurrently instead
// of under the inode lock: the device orders nothing between them (a block
// device does not either), and partial-sector writes serialize in the view.
func (n *fileNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return &handle{}, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
}

// handle is one open file description. close(2) sends a FLUSH for every
// descriptor, and a flush commits the device (for a clone, an fdatasync
// and its bitmap). A handle that changed nothing since its last flush
// skips that: losetup closes its descriptor right after handing it to the
// loop device, inside a migration's pause, and at 20 GiB that close waited
// 9-25 ms for the clone's first full commits. What others wrote is theirs
// to flush, and fsync always flushes.
type handle struct{ dirty atomic.Bool }

// changed marks f as having changed the device since its last flush.
func changed(f fs.FileHandle) {
	if h, ok := f.(*handle); ok {
		h.dirty.Store(true)
	}
}

func (n *fileNode) errno(op string, off int64, length int, err error) syscall.Errno {
	n.log.Warn().Err(err).Str("op", op).Int64("off", off).Int("len", length).Msg("I/O error returned to the kernel")
	switch {
	case errors.Is(err, blockdev.ErrOutOfRange):
		return syscall.EINVAL
	case errors.Is(err, blockdev.ErrReadOnly):
		return syscall.EROFS
	}
	return syscall.EIO
}

func (n *fileNode) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= n.size.Load() {
		return fuse.ReadResultData(nil), 0
	}
	p := dest[:min(int64(len(dest)), n.size.Load()-off)]
	n.mu.RLock()
	_, err := n.dev.ReadAt(p, off)
	n.mu.RUnlock()
	if err != nil {
		return nil, n.errno("read", off, len(p), err)
	}
	return fuse.ReadResultData(p), 0
}

func (n *fileNode) Write(ctx context.Context, f fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if off+int64(len(data)) > n.size.Load() {
		return 0, syscall.EFBIG // a block device does not grow
	}
	changed(f)
	n.mu.RLock()
	w, err := n.dev.WriteAt(data, off)
	n.mu.RUnlock()
	if err != nil {
		return 0, n.errno("write", off, len(data), err)
	}
	return uint32(w), 0
}

func (n *fileNode) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFREG | 0o600
	out.Size = uint64(n.size.Load())
	out.Blocks = uint64(n.size.Load()) / 512
	out.Blksize = BlockSize
	out.Nlink = 1
	return 0
}

// Setattr accepts only no-op size changes (some tools truncate to the same
// size); the device's size is fixed.
func (n *fileNode) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != n.size.Load() {
		return syscall.EPERM
	}
	return n.Getattr(ctx, f, out)
}

func (n *fileNode) flush(op string) syscall.Errno {
	n.mu.RLock()
	err := n.dev.Flush()
	n.mu.RUnlock()
	if err != nil {
		return n.errno(op, 0, 0, err)
	}
	return 0
}

func (n *fileNode) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno {
	if h, ok := f.(*handle); ok && !h.dirty.Load() {
		return 0
	}
	return n.flushHandle("flush", f)
}

func (n *fileNode) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	return n.flushHandle("fsync", f)
}

// flushHandle flushes the device and marks f clean; a write racing the
// flush marks it again.
func (n *fileNode) flushHandle(op string, f fs.FileHandle) syscall.Errno {
	h, ok := f.(*handle)
	if ok {
		h.dirty.Store(false)
	}
	errno := n.flush(op)
	if ok && errno != 0 {
		h.dirty.Store(true) // not flushed: the next close tries again
	}
	return errno
}

// Allocate maps the fallocate modes a loop device sends: PUNCH_HOLE (discard,
// fstrim) and ZERO_RANGE (write zeroes). Plain allocation within the device
// is a no-op: every block already exists.
func (n *fileNode) Allocate(ctx context.Context, f fs.FileHandle, off uint64, size uint64, mode uint32) syscall.Errno {
	o, l := int64(off), int64(size)
	if o < 0 || l < 0 || o > n.size.Load() {
		return syscall.EINVAL
	}
	end := min(o+l, n.size.Load())
	changed(f)
	n.mu.RLock()
	defer n.mu.RUnlock()
	switch {
	case mode&^(unix.FALLOC_FL_KEEP_SIZE|unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_ZERO_RANGE) != 0:
		return syscall.EOPNOTSUPP
	case mode&unix.FALLOC_FL_PUNCH_HOLE != 0:
		if mode&unix.FALLOC_FL_KEEP_SIZE == 0 || mode&unix.FALLOC_FL_ZERO_RANGE != 0 {
			return syscall.EINVAL // the kernel requires KEEP_SIZE with PUNCH_HOLE
		}
		if err := n.dev.Discard(o, end-o); err != nil {
			return n.errno("discard", o, int(end-o), err)
		}
	case mode&unix.FALLOC_FL_ZERO_RANGE != 0:
		if err := writeZeroes(n.dev, o, end); err != nil {
			return n.errno("write-zeroes", o, int(end-o), err)
		}
	default:
		if o+l > n.size.Load() && mode&unix.FALLOC_FL_KEEP_SIZE == 0 {
			return syscall.EFBIG
		}
	}
	return 0
}

var zeroes = make([]byte, 1<<20)

func writeZeroes(d blockdev.Device, off, end int64) error {
	for off < end {
		n := min(end-off, int64(len(zeroes)))
		if _, err := d.WriteAt(zeroes[:n], off); err != nil {
			return err
		}
		off += n
	}
	return nil
}

func (n *fileNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	out.Bsize, out.Frsize, out.NameLen = BlockSize, BlockSize, 255
	out.Blocks = uint64(n.size.Load()) / BlockSize
	return 0
}
