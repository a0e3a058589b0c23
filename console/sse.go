package console

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// poll is one blocking query: it returns once something newer than index
// exists (or the server's wait passed), with the HTML to show and the index
// to pass next.
type poll func(ctx context.Context, index uint64) (html []byte, next uint64, err error)

// stream sends server-sent events to the page: "update" with a rendered
// fragment each time the servers' index moves, "problem" with the error
// while they cannot be reached. The servers do the waiting (blocking
// queries); nothing here polls on a timer.
func (c *Console) stream(w http.ResponseWriter, r *http.Request, p poll) {
	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	ctx := r.Context()
	send := func(event string, data []byte) bool {
		var b bytes.Buffer
		fmt.Fprintf(&b, "event: %s\n", event)
		for _, line := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
			fmt.Fprintf(&b, "data: %s\n", strings.TrimRight(line, "\r"))
		}
		b.WriteString("\n")
		if _, err := w.Write(b.Bytes()); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	if _, err := w.Write([]byte("retry: 2000\n\n")); err != nil || rc.Flush() != nil {
		return
	}
	var idx uint64
	backoff := 250 * time.Millisecond
	for ctx.Err() == nil {
		html, next, err := p(ctx, idx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			c.log.Debug().Err(err).Str("path", r.URL.Path).Msg("event stream: servers not answering")
			if !send("problem", []byte(err.Error())) {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 5*time.Second)
			idx = 0 // start over: the next server may be at another index
			continue
		}
		backoff = 250 * time.Millisecond
		if idx != 0 && next == idx {
			// The server's wait passed without a change: keep the
			// connection alive through proxies and ask again.
			if _, err := w.Write([]byte(": keepalive\n\n")); err != nil || rc.Flush() != nil {
				return
			}
			continue
		}
		if !send("update", html) {
			return
		}
		idx = next
	}
}

func (c *Console) migrationsEvents(w http.ResponseWriter, r *http.Request) {
	c.stream(w, r, func(ctx context.Context, idx uint64) ([]byte, uint64, error) {
		ms, next, err := c.client.WatchMigrations(ctx, "", idx)
		if err != nil {
			return nil, 0, err
		}
		html, err := c.fragment("migrations", viewMigrations(ms, time.Now()))
		return html, next, err
	})
}

func (c *Console) migrationEvents(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	c.stream(w, r, func(ctx context.Context, idx uint64) ([]byte, uint64, error) {
		m, next, err := c.client.WatchMigration(ctx, id, idx)
		if err != nil {
			return nil, 0, err
		}
		html, err := c.fragment("migration-detail", detail(m, time.Now()))
		return html, next, err
	})
}
