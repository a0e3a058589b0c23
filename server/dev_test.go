package server_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server"
)

// TestDevServerRestart: the one-node development server (as `ferry agent
// --dev` runs it, raft on a fresh port each time) restarts from its data
// dir, leads again and keeps its state.
func TestDevServerRestart(t *testing.T) {
	dir := t.TempDir()
	tlsDir := filepath.Join(dir, "tls")
	ctx := context.Background()
	start := func() *server.Server {
		s, err := server.StartDev(ctx, zerolog.Nop(), filepath.Join(dir, "data"), tlsDir, "")
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	client := func(s *server.Server) *api.Client {
		if err := server.EnsureCerts(tlsDir, map[string]string{"w1": tlsutil.KindWorker}); err != nil {
			t.Fatal(err)
		}
		tc, err := tlsutil.ClientConfig(tlsDir, "w1")
		if err != nil {
			t.Fatal(err)
		}
		c, err := api.NewClient([]string{s.Addr()}, tc)
		if err != nil {
			t.Fatal(err)
		}
		c.RetryFor = 20 * time.Second
		return c
	}
	s := start()
	c := client(s)
	if _, err := c.RegisterWorker(ctx, fsm.Worker{Name: "w1", HostID: 1}, time.Hour); err != nil {
		t.Fatal(err)
	}
	firstRaft := s.RaftAddr()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	s = start()
	defer s.Close()
	t.Logf("raft address %s, then %s", firstRaft, s.RaftAddr())
	c = client(s)
	defer c.Close()
	w, err := c.GetWorker(ctx, "w1")
	if err != nil || w.HostID != 1 {
		t.Fatalf("after restart: %+v %v", w, err)
	}
	if _, err := c.Heartbeat(ctx, "w1", time.Hour); err != nil {
		t.Fatalf("write after restart: %v", err)
	}
}
