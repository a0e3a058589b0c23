package api

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// A server stopped with SIGSTOP still completes TCP handshakes from its
// listen backlog but never speaks TLS; one that is wedged speaks TLS and
// never answers. In both cases the client must move to the next server
// within its timeouts, not hang.
func TestClientFailsOverFromStoppedServer(t *testing.T) {
	good := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(StatusReply{Leader: "good"})
	}))
	defer good.Close()
	tlsConf := good.Client().Transport.(*http.Transport).TLSClientConfig

	// Accepts TCP and then says nothing.
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	var held []net.Conn
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	// Speaks TLS, never answers a request.
	block := make(chan struct{})
	defer close(block)
	wedged := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-block:
		case <-r.Context().Done():
		}
	}))
	wedged.TLS = good.TLS
	wedged.StartTLS()
	defer wedged.Close()

	goodAddr := strings.TrimPrefix(good.URL, "https://")
	for name, first := range map[string]string{
		"silent TCP": silent.Addr().String(),
		"wedged":     strings.TrimPrefix(wedged.URL, "https://"),
	} {
		t.Run(name, func(t *testing.T) {
			c, err := NewClient([]string{first, goodAddr}, tlsConf)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.RequestTimeout = 500 * time.Millisecond
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			st, err := c.Status(ctx)
			if err != nil {
				t.Fatalf("Status with %s first: %v", name, err)
			}
			if st.Leader != "good" {
				t.Fatalf("answer from %q, want the good server", st.Leader)
			}
			// DialTimeout bounds the TLS handshake, RequestTimeout the rest.
			if el := time.Since(start); el > DialTimeout+2*time.Second {
				t.Fatalf("failover took %v", el)
			}
		})
	}
}

func TestAttemptTimeoutCoversWatchWait(t *testing.T) {
	c := &Client{RequestTimeout: 10 * time.Second}
	if got := c.attemptTimeout(watchQuery("w", 0, 0)); got != 10*time.Second {
		t.Fatalf("plain request budget %v, want 10s", got)
	}
	if got := c.attemptTimeout(watchQuery("w", 5, 0)); got != 40*time.Second {
		t.Fatalf("watch with the server's default wait: budget %v, want 40s", got)
	}
	if got := c.attemptTimeout(watchQuery("w", 5, 2*time.Minute)); got != 130*time.Second {
		t.Fatalf("watch with a 2m wait: budget %v, want 130s", got)
	}
}
