package api

import (
	"context"
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// A server that never answers (a network split drops its packets) fails a
// call only by the caller's deadline; the next call must go elsewhere.
func TestClientMovesOnFromASilentServer(t *testing.T) {
	release := make(chan struct{})
	silent := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	defer silent.Close()
	defer close(release)
	ok := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"id":"s1","leader":"s1"}`))
	}))
	defer ok.Close()
	tc := &tls.Config{InsecureSkipVerify: true} // test servers' own certificates
	c, err := NewClient([]string{strings.TrimPrefix(silent.URL, "https://"), strings.TrimPrefix(ok.URL, "https://")}, tc)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err = c.Status(ctx)
	cancel()
	if err == nil {
		t.Fatal("the silent server answered")
	}
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := c.Status(ctx)
	if err != nil || st.ID != "s1" {
		t.Fatalf("second call: %+v, %v; want the other server's answer", st, err)
	}
}
