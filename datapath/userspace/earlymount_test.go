package userspace

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// A clone's FUSE file is mounted while the clone opens; when the clone
// then fails (no source, a wrong key), the mount goes with it.
func TestEarlyMountGoesWithAFailedClone(t *testing.T) {
	b := hostBackend(t, t.TempDir())
	t.Cleanup(func() { b.CleanupAll(context.Background()) })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pass := []byte("early-mount-passphrase")
	layout, err := b.Create(ctx, "src", 32<<20, pass)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		clone Clone
		pass  []byte
	}{
		{"no source", Clone{Portal: "127.0.0.1:1", IQN: "iqn.2026-12.dev.ferry:none"}, pass},
		{"wrong key", Clone{SourcePath: b.DataPath("src")}, []byte("not the passphrase")},
	} {
		cfg := b.Config("dst", layout)
		cl := tc.clone
		cl.MetaPath, cl.RegionSize = filepath.Join(t.TempDir(), "clone.meta"), 4096
		cfg.Clone = &cl
		if err := Serve(ctx, zerolog.Nop(), cfg, tc.pass, nil); err == nil {
			t.Fatalf("%s: the clone was served", tc.name)
		}
		mounts, _ := os.ReadFile("/proc/self/mounts")
		if strings.Contains(string(mounts), cfg.MountDir) {
			t.Fatalf("%s: the FUSE file is still mounted at %s after the clone failed", tc.name, cfg.MountDir)
		}
	}
}
