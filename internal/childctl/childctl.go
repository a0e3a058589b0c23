// Package childctl is how ferry talks to its child processes (a volume's
// datapath, an iSCSI export, a foreground `ferry clone`): JSON over HTTP on
// a unix socket that only root can reach. The child serves it; the parent
// polls it for readiness and sends requests; any later process adopts the
// child by dialling the same path.
package childctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

// Listen opens the control socket at path (replacing a stale one), 0600.
func Listen(path string) (net.Listener, error) {
	_ = os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return ln, nil
}

// Serve answers h on ln until Close.
func Serve(ln net.Listener, h http.Handler) *http.Server {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	return srv
}

// Reply writes v as JSON, or err with status (409 unless err is a *Error).
func Reply(w http.ResponseWriter, v any, err error) {
	if err != nil {
		status := http.StatusConflict
		var e *Error
		if errors.As(err, &e) && e.Status != 0 {
			status = e.Status
		}
		http.Error(w, err.Error(), status)
		return
	}
	if v == nil {
		v = struct{}{}
	}
	json.NewEncoder(w).Encode(v)
}

// Error is a child's answer other than 200: Status 409 is a refusal in its
// current state, 400 a malformed request.
type Error struct {
	Path    string
	Status  int
	Message string
}

func (e *Error) Error() string {
	if e.Path == "" {
		return e.Message
	}
	return fmt.Sprintf("%s: %s", e.Path, e.Message)
}

// Refused reports whether the child refused a valid request in its state.
func (e *Error) Refused() bool { return e.Status == http.StatusConflict }

// Client calls one child's control socket.
type Client struct {
	Socket string
	http   *http.Client
}

// Dial returns a client of the child at socket (nothing is sent yet).
func Dial(socket string) *Client {
	return &Client{Socket: socket, http: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}}
}

// Call sends in (if not nil) as JSON and decodes the reply into out (if
// not nil). A non-200 answer is an *Error.
func (c *Client) Call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://child"+path, body)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%s on %s: %w", path, c.Socket, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return &Error{Path: path, Status: resp.StatusCode, Message: string(bytes.TrimSpace(b))}
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("%s reply: %w", path, err)
		}
	}
	return nil
}

// WaitReady polls path until the child answers, it exits (exited yields),
// ctx ends or timeout passes. It looks every millisecond for the first
// quarter second, then every 20 ms: children start inside a migration's
// downtime, and one ready in 30 ms is then seen at once, not up to 20 ms
// later.
func (c *Client) WaitReady(ctx context.Context, path string, out any, exited <-chan error, timeout time.Duration) error {
	start := time.Now()
	deadline := start.Add(timeout)
	for {
		if err := c.Call(ctx, http.MethodGet, path, nil, out); err == nil {
			return nil
		}
		select {
		case err := <-exited:
			return fmt.Errorf("exited before it was ready (%v)", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(pollEvery(time.Since(start))):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %v", timeout)
		}
	}
}

// pollEvery is WaitReady's interval after waiting for waited.
func pollEvery(waited time.Duration) time.Duration {
	if waited < 250*time.Millisecond {
		return time.Millisecond
	}
	return 20 * time.Millisecond
}

// Decode reads a request's JSON body into v, refusing unknown fields.
func Decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}
