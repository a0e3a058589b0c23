package userspace

import (
	"testing"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/blockdev/blockdevtest"
)

func TestSwitchConformance(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T, size int64) blockdev.Device {
		return newSwitch(blockdev.NewMem(size))
	}, blockdevtest.Options{DiscardZeroes: true})
}

func TestSwitchSwapsUnderReaders(t *testing.T) {
	a, b := blockdev.NewMem(4096), blockdev.NewMem(4096)
	b.WriteAt([]byte{7}, 0)
	s := newSwitch(a)
	p := make([]byte, 1)
	s.ReadAt(p, 0)
	if p[0] != 0 {
		t.Fatal("read from wrong device before swap")
	}
	if old := s.Swap(b); old != a {
		t.Fatal("Swap did not return the previous device")
	}
	s.ReadAt(p, 0)
	if p[0] != 7 {
		t.Fatal("read did not go to the new device after swap")
	}
}
