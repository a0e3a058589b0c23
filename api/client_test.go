package api

import (
	"context"
	"crypto/tls"
	"errors"
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

// silentThenAnswering is a client of two servers: the first never answers
// (a request waits until it gives up), the second answers at once (index 7
// for the migrations' watch). Both close with the test.
func silentThenAnswering(t *testing.T) (silent *httptest.Server, c *Client) {
	t.Helper()
	release := make(chan struct{})
	silent = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	ok := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/v1/migrations" {
			w.Header().Set(IndexHeader, "7")
			w.Write([]byte(`[]`))
			return
		}
		w.Write([]byte(`{"id":"s1","leader":"s1"}`))
	}))
	tc := &tls.Config{InsecureSkipVerify: true} // test servers' own certificates
	c, err := NewClient([]string{strings.TrimPrefix(silent.URL, "https://"), strings.TrimPrefix(ok.URL, "https://")}, tc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		close(release)
		silent.Close()
		ok.Close()
	})
	return silent, c
}

// A blocking watch waiting on a server that stopped answering (SIGSTOP:
// its kernel still holds the connection) moves to another server as soon
// as any other request of the client finds that server unresponsive,
// instead of waiting out the watch's own, much longer, deadline.
func TestClientMovesWaitingWatchOffASuspectServer(t *testing.T) {
	_, c := silentThenAnswering(t)
	type result struct {
		idx uint64
		err error
		at  time.Time
	}
	watched := make(chan result, 1)
	go func() {
		_, idx, err := c.WatchMigrations(context.Background(), "w1", 3)
		watched <- result{idx, err, time.Now()}
	}()
	time.Sleep(200 * time.Millisecond) // the watch is waiting on the silent server
	select {
	case r := <-watched:
		t.Fatalf("the watch returned before any request found the server silent: %+v", r)
	default:
	}
	// Under load the call may reach the other server (it moves on from a
	// quick failure too); the watch must be off the silent one either way.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_, err := c.Status(ctx)
	cancel()
	t.Logf("a call with a 300ms deadline: %v", err)
	suspected := time.Now()
	select {
	case r := <-watched:
		if r.err != nil || r.idx != 7 {
			t.Fatalf("the watch moved off the silent server but returned %d, %v; want index 7 from the other server", r.idx, r.err)
		}
		t.Logf("the watch answered %v after the server was found silent", r.at.Sub(suspected).Round(time.Millisecond))
	case <-time.After(5 * time.Second):
		t.Fatal("the watch still waits on the silent server 5s after another request found it unresponsive (its own deadline is 40s)")
	}
}

// A new request that cannot reach a server at all (its listener gone, a
// quick failure, not a timeout) moves the watch still waiting there over
// an older connection as well.
func TestClientMovesWaitingWatchOffAnUnreachableServer(t *testing.T) {
	gone, c := silentThenAnswering(t)
	type result struct {
		idx uint64
		err error
	}
	watched := make(chan result, 1)
	go func() {
		_, idx, err := c.WatchMigrations(context.Background(), "w1", 3)
		watched <- result{idx, err}
	}()
	time.Sleep(200 * time.Millisecond) // the watch is waiting on the first server
	select {
	case r := <-watched:
		t.Fatalf("the watch returned before the server went away: %+v", r)
	default:
	}
	gone.Listener.Close() // new connections are refused; the watch's stays
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if st, err := c.Status(ctx); err != nil || st.ID != "s1" {
		t.Fatalf("status: %+v, %v; want the other server's answer", st, err)
	}
	select {
	case r := <-watched:
		if r.err != nil || r.idx != 7 {
			t.Fatalf("the watch moved but returned %d, %v; want index 7 from the other server", r.idx, r.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the watch still waits on a server a new request could not reach, 5s later (its own deadline is 40s)")
	}
}

// A blocking query that chose a server just before another request found
// it unresponsive, and registers only after, starts cancelled instead of
// waiting there unseen until its own deadline; one that chose it after
// waits as usual.
func TestWatchThatChoseASuspectedServerStartsCancelled(t *testing.T) {
	c := &Client{addrs: []string{"a:1", "b:1"}}
	gen := c.suspects["a:1"]
	c.suspect("a:1")
	stale, release := c.track(context.Background(), "a:1", gen)
	defer release()
	if !errors.Is(context.Cause(stale), errServerSuspect) {
		t.Fatalf("an attempt that chose the server before it was suspected: cause %v, want errServerSuspect", context.Cause(stale))
	}
	fresh, release2 := c.track(context.Background(), "a:1", c.suspects["a:1"])
	defer release2()
	if fresh.Err() != nil {
		t.Fatalf("an attempt that chose the server after it was suspected was cancelled: %v", context.Cause(fresh))
	}
	c.suspect("a:1")
	if !errors.Is(context.Cause(fresh), errServerSuspect) {
		t.Fatalf("a waiting attempt was not cancelled when its server was suspected: %v", context.Cause(fresh))
	}
}
