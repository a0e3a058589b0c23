package childctl

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestCallAndErrors(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "c.sock")
	ln, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", st.Mode(), err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		var in map[string]int
		if err := Decode(r, &in); err != nil {
			Reply(w, nil, &Error{Status: http.StatusBadRequest, Message: err.Error()})
			return
		}
		Reply(w, in, nil)
	})
	mux.HandleFunc("POST /refuse", func(w http.ResponseWriter, r *http.Request) { Reply(w, nil, errors.New("busy")) })
	srv := Serve(ln, mux)
	defer srv.Close()

	c := Dial(sock)
	ctx := context.Background()
	var out map[string]int
	if err := c.Call(ctx, http.MethodPost, "/echo", map[string]int{"a": 1}, &out); err != nil || out["a"] != 1 {
		t.Fatalf("echo: %v %v", out, err)
	}
	var e *Error
	if err := c.Call(ctx, http.MethodPost, "/refuse", nil, nil); !errors.As(err, &e) || !e.Refused() || e.Message != "busy" {
		t.Fatalf("refusal: %v", err)
	}
	if err := c.Call(ctx, http.MethodPost, "/echo", nil, nil); !errors.As(err, &e) || e.Status != http.StatusBadRequest || e.Refused() {
		t.Fatalf("bad request: %v", err)
	}
	if err := c.Call(ctx, http.MethodGet, "/nothing", nil, nil); !errors.As(err, &e) || e.Status != http.StatusNotFound {
		t.Fatalf("unknown path: %v", err)
	}
}

func TestWaitReady(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "c.sock")
	c := Dial(sock)
	exited := make(chan error, 1)
	exited <- errors.New("exit status 1")
	if err := c.WaitReady(context.Background(), "/s", nil, exited, 5*time.Second); err == nil {
		t.Fatal("ready though the child exited")
	}
	if err := c.WaitReady(context.Background(), "/s", nil, nil, 100*time.Millisecond); err == nil {
		t.Fatal("ready though nothing listens")
	}
	go func() {
		time.Sleep(100 * time.Millisecond)
		ln, err := Listen(sock)
		if err != nil {
			return
		}
		mux := http.NewServeMux()
		mux.HandleFunc("GET /s", func(w http.ResponseWriter, r *http.Request) { Reply(w, map[string]bool{"ok": true}, nil) })
		Serve(ln, mux)
	}()
	var st map[string]bool
	if err := c.WaitReady(context.Background(), "/s", &st, nil, 5*time.Second); err != nil || !st["ok"] {
		t.Fatalf("WaitReady: %v %v", st, err)
	}
}
