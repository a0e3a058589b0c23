package api

import (
	"testing"
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
