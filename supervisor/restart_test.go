package supervisor

import (
	"testing"
	"time"
)

func TestRestartPolicy(t *testing.T) {
	r := newRestarts(time.Second, 8*time.Second, time.Minute, 3)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	// A machine never seen running is a first start: no crash, no wait.
	if v := r.stopped("m", now); v.Crashed || v.Wait != 0 || v.Failed {
		t.Fatalf("first start: %+v", v)
	}
	r.sawRunning("m")
	v := r.stopped("m", now)
	if !v.Crashed || v.Crashes != 1 || v.Failed || v.Wait < 500*time.Millisecond || v.Wait > 1500*time.Millisecond {
		t.Fatalf("first crash: %+v, want a wait of about 1s", v)
	}
	// Until the wait passed, no start and no new crash.
	if v := r.stopped("m", now.Add(100*time.Millisecond)); v.Crashed || v.Wait == 0 {
		t.Fatalf("during the backoff: %+v", v)
	}
	if v := r.stopped("m", now.Add(2*time.Second)); v.Wait != 0 {
		t.Fatalf("after the backoff: %+v, want a start", v)
	}
	r.sawRunning("m")
	v = r.stopped("m", now.Add(3*time.Second))
	if !v.Crashed || v.Crashes != 2 || v.Wait < time.Second {
		t.Fatalf("second crash: %+v, want about 2s of backoff", v)
	}
	r.sawRunning("m")
	if v := r.stopped("m", now.Add(10*time.Second)); !v.Failed || v.Crashes != 3 {
		t.Fatalf("third crash in the window: %+v, want failed", v)
	}
	// Crashes outside the window do not count.
	r.forget("m")
	r.sawRunning("m")
	r.stopped("m", now)
	r.sawRunning("m")
	r.stopped("m", now.Add(2*time.Second))
	r.sawRunning("m")
	if v := r.stopped("m", now.Add(5*time.Minute)); v.Failed || v.Crashes != 1 {
		t.Fatalf("a crash after a quiet window: %+v, want a count of 1", v)
	}
}
