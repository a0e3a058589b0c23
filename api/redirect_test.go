package api

import (
	"testing"
	"time"
)

// A follower's redirect is followed only when it is a plain host:port.
func TestValidLeaderHint(t *testing.T) {
	for _, h := range []string{"127.0.0.1:7400", "[fd00::1]:7400", "s1.example:7400"} {
		if validLeaderHint(h) != h {
			t.Errorf("%q dropped", h)
		}
	}
	for _, h := range []string{"", "127.0.0.1", "https://evil:1/x", "evil:1/x", "user@evil:1", "a b:1", ":7400"} {
		if validLeaderHint(h) != "" {
			t.Errorf("%q kept", h)
		}
	}
}

func TestJitterBounds(t *testing.T) {
	d := 100 * time.Millisecond
	seen := map[time.Duration]bool{}
	for i := 0; i < 200; i++ {
		j := jitter(d)
		if j < d/2 || j >= 3*d/2 {
			t.Fatalf("jitter(%s) = %s", d, j)
		}
		seen[j] = true
	}
	if len(seen) < 10 {
		t.Fatalf("jitter barely varies: %d distinct values", len(seen))
	}
}
