// Package stepmark records a worker's local one-shot side effects that no
// event records (the network moved at cutover, a migration reaped), durably:
// each mark is a file written with write-temp, fsync, rename, fsync dir.
package stepmark

import (
	"os"
	"path/filepath"
	"time"

	"github.com/ferry-dev/ferry/internal/atomicfile"
)

// Dir keeps marks as files in one folder.
type Dir string

func (d Dir) path(id, what string) string { return filepath.Join(string(d), id+"."+what) }

// Done reports whether what was marked done for id.
func (d Dir) Done(id, what string) bool {
	_, err := os.Stat(d.path(id, what))
	return err == nil
}

// Mark records that what is done for id.
func (d Dir) Mark(id, what string) error {
	return atomicfile.WriteFile(d.path(id, what), []byte(time.Now().UTC().Format(time.RFC3339Nano)+"\n"), 0o600)
}
