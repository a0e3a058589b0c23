package userspace

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// The key is asked for beside the datapath's start, only when a process
// starts: a key that fails fails the mount with its own error and leaves
// no process; a slow one is waited for; an adopted process asks none.
func TestMountKeyedAsksTheKeyBesideTheStart(t *testing.T) {
	b := hostBackend(t, t.TempDir())
	t.Cleanup(func() { b.CleanupAll(context.Background()) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const vol = "kv1"
	pass := []byte("keyed-passphrase")
	layout, err := b.Create(ctx, vol, 32<<20, pass)
	if err != nil {
		t.Fatal(err)
	}
	mnt := b.MountPoint("m")
	cfg := b.Config(vol, layout)

	errKey := errors.New("the servers are unreachable")
	if _, err := b.mount(ctx, cfg, func(context.Context) ([]byte, error) { return nil, errKey }, mnt); err == nil || !strings.Contains(err.Error(), errKey.Error()) {
		t.Fatalf("mount with a failing key: %v, want the key's error", err)
	}
	if _, err := Adopt(ctx, cfg); err == nil {
		t.Fatal("a datapath answers after its key failed")
	}

	var asked atomic.Int32
	slow := func(context.Context) ([]byte, error) {
		asked.Add(1)
		time.Sleep(200 * time.Millisecond)
		return append([]byte(nil), pass...), nil
	}
	if _, err := b.mount(ctx, cfg, slow, mnt); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("served"), 0o600); err != nil {
		t.Fatal(err)
	}
	if asked.Load() != 1 {
		t.Fatalf("key asked %d times, want 1", asked.Load())
	}
	// Adopted: the process runs, no key is asked.
	if _, err := b.mount(ctx, cfg, func(context.Context) ([]byte, error) { asked.Add(1); return nil, errKey }, mnt); err != nil {
		t.Fatalf("mount of a running datapath: %v", err)
	}
	if asked.Load() != 1 {
		t.Fatal("an adopted datapath asked for the key")
	}
}
