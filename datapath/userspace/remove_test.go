package userspace

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/rs/zerolog"
)

// TestRemoveRefusesPathLikeVolume: removing volume "." or ".." deletes
// nothing (it once removed the whole volumes folder or the data dir).
func TestRemoveRefusesPathLikeVolume(t *testing.T) {
	dir := t.TempDir()
	keep := filepath.Join(dir, "volumes", "other", "data")
	if err := os.MkdirAll(filepath.Dir(keep), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keep, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	v := &Backend{DataDir: dir, Log: zerolog.Nop()}
	for _, id := range []string{".", "..", "../.."} {
		if err := v.Remove(context.Background(), id); err == nil {
			t.Errorf("Remove(%q) succeeded", id)
		}
	}
	if _, err := os.Stat(keep); err != nil {
		t.Fatalf("another volume's data is gone: %v", err)
	}
}
