package userspace

import (
	"time"

	"github.com/ferry-dev/ferry/blockdev"
)

// pendingSource is a clone's source while its first iSCSI session still
// logs in: the engine opens over it meanwhile (it asks only the size, which
// the carried layout gives). Every other call waits for the login and then
// goes to the LUN, or fails with the login's error.
type pendingSource struct {
	size  int64
	ready chan struct{}
	dev   blockdev.Device
	err   error
	took  time.Duration
}

func newPendingSource(size int64) *pendingSource {
	return &pendingSource{size: size, ready: make(chan struct{})}
}

// set records the login's outcome; called once.
func (p *pendingSource) set(dev blockdev.Device, err error, took time.Duration) {
	if err == nil && dev == nil {
		err = blockdev.ErrClosed
	}
	p.dev, p.err, p.took = dev, err, took
	close(p.ready)
}

// wait returns the login's outcome once it is known.
func (p *pendingSource) wait() (blockdev.Device, time.Duration, error) {
	<-p.ready
	return p.dev, p.took, p.err
}

func (p *pendingSource) get() (blockdev.Device, error) {
	<-p.ready
	return p.dev, p.err
}

func (p *pendingSource) Size() int64 { return p.size }

func (p *pendingSource) ReadAt(b []byte, off int64) (int, error) {
	d, err := p.get()
	if err != nil {
		return 0, err
	}
	return d.ReadAt(b, off)
}

func (p *pendingSource) WriteAt(b []byte, off int64) (int, error) {
	d, err := p.get()
	if err != nil {
		return 0, err
	}
	return d.WriteAt(b, off)
}

func (p *pendingSource) Discard(off, length int64) error {
	d, err := p.get()
	if err != nil {
		return err
	}
	return d.Discard(off, length)
}

func (p *pendingSource) Flush() error {
	d, err := p.get()
	if err != nil {
		return err
	}
	return d.Flush()
}

// Close closes the LUN once the login ended (a failed login left none).
func (p *pendingSource) Close() error {
	d, err := p.get()
	if err != nil {
		return nil
	}
	return d.Close()
}
