package datapath

import (
	"context"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"
)

// A second datapath may start only when nothing holds the socket: not when
// the caller's context ended, nor when a live process is slow to answer.
func TestMayStartAnother(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{VolumeID: "v", Socket: filepath.Join(dir, "v.sock")}
	ctx := context.Background()

	// No socket file: start.
	_, err := Adopt(ctx, cfg)
	if err == nil {
		t.Fatal("adopted a process that does not exist")
	}
	if err := mayStartAnother(ctx, cfg, err); err != nil {
		t.Fatalf("no socket: %v", err)
	}

	// A stale socket file (its process died): start.
	ln, err := net.Listen("unix", cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	_, err = Adopt(ctx, cfg)
	if err == nil {
		t.Fatal("adopted a dead socket")
	}
	if err := mayStartAnother(ctx, cfg, err); err != nil {
		t.Fatalf("stale socket: %v", err)
	}

	// A live process that does not answer in time: do not start.
	slow := Config{VolumeID: "v", Socket: filepath.Join(dir, "slow.sock")}
	ln, err = net.Listen("unix", slow.Socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	})}
	go srv.Serve(ln)
	defer srv.Close()
	tctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	_, err = Adopt(tctx, slow)
	cancel()
	if err == nil {
		t.Fatal("adopted a process that never answered")
	}
	if err := mayStartAnother(ctx, slow, err); err == nil {
		t.Fatal("a live, slow process would get a second datapath over it")
	}

	// The caller's context ended: do not start, say why.
	cctx, ccancel := context.WithCancel(ctx)
	ccancel()
	if err := mayStartAnother(cctx, cfg, errors.New("whatever")); !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled context: %v", err)
	}
}
