package retry

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestBackoffCappedAndJittered(t *testing.T) {
	b := New(10*time.Millisecond, 80*time.Millisecond)
	seen := map[time.Duration]bool{}
	for i := 0; i < 200; i++ {
		d := b.Next()
		if d <= 0 || d > time.Duration(float64(80*time.Millisecond)*(1+Jitter)) {
			t.Fatalf("delay %d = %v, want in (0, 120ms]", i, d)
		}
		seen[d] = true
	}
	// Jitter: two hundred draws at the cap are not all the same delay.
	if len(seen) < 10 {
		t.Fatalf("only %d distinct delays: no jitter", len(seen))
	}
	b.Reset()
	if d := b.Next(); d > 15*time.Millisecond {
		t.Fatalf("after Reset the delay is %v, want about 10ms", d)
	}
}

func TestBackoffNeverStops(t *testing.T) {
	// The library stops after MaxElapsedTime by default in some versions;
	// ours must keep yielding delays for loops that retry forever.
	b := New(time.Millisecond, time.Millisecond)
	for i := 0; i < 10000; i++ {
		if d := b.Next(); d < 0 {
			t.Fatalf("delay %d is %v: the backoff stopped", i, d)
		}
	}
}

func TestDo(t *testing.T) {
	n := 0
	err := Do(context.Background(), time.Millisecond, 2*time.Millisecond, func() error {
		if n++; n < 3 {
			return errors.New("not yet")
		}
		return nil
	}, nil)
	if err != nil || n != 3 {
		t.Fatalf("Do = %v after %d calls, want nil after 3", err, n)
	}
	stop := errors.New("stop")
	n = 0
	err = Do(context.Background(), time.Millisecond, time.Millisecond, func() error { n++; return Permanent(stop) }, nil)
	if !errors.Is(err, stop) || n != 1 {
		t.Fatalf("Do with a permanent error = %v after %d calls", err, n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err = Do(ctx, time.Hour, time.Hour, func() error { return errors.New("fails") }, nil)
	if err == nil {
		t.Fatal("Do on a cancelled context returned nil")
	}
}
