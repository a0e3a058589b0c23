package agent

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
)

// TestLocalID: IDs that would reach outside a data folder are refused
// before any path is built or removed.
func TestLocalID(t *testing.T) {
	for _, id := range []string{"", ".", "..", "../x", "a/b", "/etc", ".hidden", "A"} {
		if localID("volume", id) == nil {
			t.Errorf("%q accepted", id)
		}
	}
	for _, id := range []string{"v1", "vol-a_1", "mig-0123abcd"} {
		if err := localID("volume", id); err != nil {
			t.Errorf("%q refused: %v", id, err)
		}
	}
	if migrationIDsLocal(&fsm.Migration{ID: "m1", Volume: "v1", Machine: "ma", TargetVol: ".."}) == nil {
		t.Error("a migration naming target volume .. was accepted")
	}
}

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
	v := &Volumes{DataDir: dir, Log: zerolog.Nop()}
	for _, id := range []string{".", "..", "../.."} {
		if err := v.Remove(context.Background(), id); err == nil {
			t.Errorf("Remove(%q) succeeded", id)
		}
	}
	if _, err := os.Stat(keep); err != nil {
		t.Fatalf("another volume's data is gone: %v", err)
	}
}
