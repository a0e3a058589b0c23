package userspace

import (
	"context"
	"io"
	"sync"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath/internal/ext4hot"
)

// A clone fetches what it needs on demand, one region per round trip to
// the source, while the machine waits: ext4's superblock, descriptors,
// bitmaps, inodes and journal as the mount, fstrim and the machine's first
// writes touch them. Those are known once the view opens, so they are read
// ahead in a few reads in parallel with the rest of the start (FUSE, the
// loop device, the mount). The reads go through the clone like any other
// (the engine fetches, writes and marks each region, and never over a
// local write); their bytes are dropped.
//
// The LUKS2 header and keyslot are not read ahead: measured (docs/
// profiles.md), a parallel wave of them before the view opened made the
// clone's start slower than the view's own five small serial reads.
const (
	prefetchWorkers = 4
	prefetchChunk   = 256 << 10
)

// prefetcher runs read-aheads until they end or it is stopped.
type prefetcher struct {
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	mu      sync.Mutex
	stopped bool
}

func newPrefetcher() *prefetcher {
	ctx, cancel := context.WithCancel(context.Background())
	return &prefetcher{ctx: ctx, cancel: cancel}
}

// stage is one read-ahead: what it is, and its ranges, listed once the
// stages before it ended (a list may read what they brought).
type stage struct {
	what string
	list func() ([]blockdev.Range, error)
}

// run reads each stage's ranges from dev in the background, one stage
// after the other, and calls done with what each read; a stage that fails
// ends the run. After stop it does nothing.
func (p *prefetcher) run(dev io.ReaderAt, done func(what string, n int64, took time.Duration, err error), stages ...stage) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stopped {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for _, st := range stages {
			t0 := time.Now()
			rs, err := st.list()
			var n int64
			if err == nil {
				n, err = readRanges(p.ctx, dev, rs, prefetchWorkers, prefetchChunk)
			}
			done(st.what, n, time.Since(t0), err)
			if err != nil || p.ctx.Err() != nil {
				return
			}
		}
	}()
}

// stop ends the read-aheads and waits for the reads in flight.
func (p *prefetcher) stop() {
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
	p.cancel()
	p.wg.Wait()
}

// readRanges reads rs from dev in pieces of at most chunk bytes, workers
// at a time, and returns how many bytes it read; it stops at the first
// error or when ctx ends.
func readRanges(ctx context.Context, dev io.ReaderAt, rs []blockdev.Range, workers int, chunk int64) (int64, error) {
	pieces := make(chan blockdev.Range)
	var mu sync.Mutex
	var n int64
	var first error
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk)
			for r := range pieces {
				_, err := dev.ReadAt(buf[:r.Len], r.Off)
				mu.Lock()
				if err == nil {
					n += r.Len
				} else if first == nil {
					first = err
				}
				mu.Unlock()
			}
		}()
	}
	failed := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return first != nil
	}
feed:
	for _, r := range rs {
		for off := r.Off; off < r.End(); off += chunk {
			if failed() || ctx.Err() != nil {
				break feed
			}
			select {
			case pieces <- blockdev.Range{Off: off, Len: min(chunk, r.End()-off)}:
			case <-ctx.Done():
				break feed
			}
		}
	}
	close(pieces)
	wg.Wait()
	if first == nil {
		first = ctx.Err()
	}
	return n, first
}

// ext4Stages are the read-aheads of an ext4 filesystem, parsed on the
// plaintext view, as ranges of the device under it: its hot metadata
// (ext4hot.Ranges), read while the file and the mount start, and the data
// of its most recently modified files (ext4hot.RecentFiles, which reads
// the inode tables the first brought), read once the filesystem is
// mounted: beside the mount, on the source's one connection, they held
// the mount's own reads back. The view's plaintext byte p is the
// ciphertext at dataOffset+p (one segment, length-preserving sectors), so
// the read-ahead needs no decryption.
func ext4Stages(view blockdev.Device, dataOffset int64) (metadata, files stage) {
	under := func(parse func(io.ReaderAt, int64, ext4hot.Limits) ([]blockdev.Range, error), lim ext4hot.Limits) func() ([]blockdev.Range, error) {
		return func() ([]blockdev.Range, error) {
			rs, err := parse(view, view.Size(), lim)
			for i := range rs {
				rs[i].Off += dataOffset
			}
			return rs, err
		}
	}
	return stage{"ext4 metadata", under(ext4hot.Ranges, ext4hot.DefaultLimits)},
		stage{"recent files", under(ext4hot.RecentFiles, ext4hot.RecentLimits)}
}
