package iscsi

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestByteExact256MiB is the full-size check: a random 256 MiB image
// read through ferry's initiator from tgtd and from ferry's own export.
// Skipped with -short (it moves half a GiB).
func TestByteExact256MiB(t *testing.T) {
	if testing.Short() {
		t.Skip("moves 512 MiB; run without -short")
	}
	needRoot(t)
	const size = 256 << 20
	path := filepath.Join(t.TempDir(), "image")
	writeRandomFile(t, path, size)
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	check := func(name, portal, iqn string, lun uint64) {
		t.Helper()
		l, err := Dial(context.Background(), testLogger(t), InitiatorConfig{Portal: portal, IQN: iqn, LUN: lun, Timeout: 10 * time.Second})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		defer l.Close()
		clear(got)
		if _, err := l.ReadAt(got, 0); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: 256 MiB read differs", name)
		}
	}
	e, _ := startTestExport(t, path, nil)
	check("ferry export", e.Portal(), e.IQN(), 0)
	portal, iqn := startTgtd(t, path)
	check("tgtd", portal, iqn, 1)
}
