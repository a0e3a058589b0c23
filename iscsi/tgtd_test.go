package iscsi

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"sync"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
)

func TestInitiatorAgainstTgtd(t *testing.T) {
	const size = 32 << 20
	image, want := randomImage(t, size)
	portal, iqn := startTgtd(t, image)
	ctx := context.Background()
	lun, err := Dial(ctx, testLogger(t), InitiatorConfig{Portal: portal, IQN: iqn, LUN: 1, Timeout: 5 * time.Second, QueueDepth: 8, MaxTransfer: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer lun.Close()
	if lun.Size() != size {
		t.Fatalf("Size = %d, want %d", lun.Size(), size)
	}
	got := make([]byte, size)
	if _, err := lun.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("whole-LUN read differs from the image")
	}
	// Many goroutines, unaligned and small reads.
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed))
			for i := 0; i < 50; i++ {
				n := 1 + rng.Intn(300<<10)
				off := rng.Int63n(size - int64(n))
				b := make([]byte, n)
				if _, err := lun.ReadAt(b, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(b, want[off:off+int64(n)]) {
					errs <- errors.New("concurrent read differs")
					return
				}
			}
		}(int64(g))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if _, err := lun.WriteAt(make([]byte, 512), 0); !errors.Is(err, blockdev.ErrReadOnly) {
		t.Fatalf("WriteAt: %v, want ErrReadOnly", err)
	}
}
