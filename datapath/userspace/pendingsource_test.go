package userspace

import (
	"errors"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/blockdev/blockdevtest"
)

// A pending source whose login succeeds (a moment after it is opened) is
// the device the login gave: the conformance suite, through it.
func TestPendingSourceConformance(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T, size int64) blockdev.Device {
		p := newPendingSource(size)
		go func() {
			time.Sleep(time.Millisecond)
			p.set(blockdev.NewMem(size), nil, time.Millisecond)
		}()
		return p
	}, blockdevtest.Options{DiscardZeroes: true})
}

// Before the login ends only the size answers; a failed login fails every
// call with its error, and closing closes nothing.
func TestPendingSourceFailedLogin(t *testing.T) {
	p := newPendingSource(4096)
	if p.Size() != 4096 {
		t.Fatalf("size %d before the login", p.Size())
	}
	read := make(chan error, 1)
	go func() {
		_, err := p.ReadAt(make([]byte, 512), 0)
		read <- err
	}()
	select {
	case err := <-read:
		t.Fatalf("a read returned (%v) before the login ended", err)
	case <-time.After(20 * time.Millisecond):
	}
	boom := errors.New("login refused")
	p.set(nil, boom, time.Second)
	if err := <-read; !errors.Is(err, boom) {
		t.Fatalf("read after a failed login: %v", err)
	}
	if _, err := p.WriteAt(make([]byte, 512), 0); !errors.Is(err, boom) {
		t.Fatalf("write: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("close after a failed login: %v", err)
	}
	if _, took, err := p.wait(); !errors.Is(err, boom) || took != time.Second {
		t.Fatalf("wait: %v %v", took, err)
	}
}
