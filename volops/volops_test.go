package volops

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
)

func TestNoProgressReason(t *testing.T) {
	// A temp dir has far less free space than an exabyte to hydrate.
	r := noProgressReason(t.TempDir(), &datapath.Progress{TotalBytes: 1 << 60}, 30*time.Second)
	if !strings.Contains(r, "no space left") {
		t.Fatalf("reason %q does not name the full disk", r)
	}
	r = noProgressReason(t.TempDir(), &datapath.Progress{TotalBytes: 4096, HydratedBytes: 4096}, 30*time.Second)
	if !strings.Contains(r, "no progress for 30s") {
		t.Fatalf("reason %q", r)
	}
}

func TestKnownZeroOfSparseVolume(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v")
	d, err := blockdev.CreateSparse(path, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	d.WriteAt([]byte{1}, 0)
	d.WriteAt([]byte{1}, 32<<20)
	d.Close()
	zs, err := knownZero(path)
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, z := range zs {
		total += z.Len
		if z.Off <= 0 && z.End() > 0 || z.Off <= 32<<20 && z.End() > 32<<20 {
			t.Fatalf("range %+v covers written data", z)
		}
	}
	if total < 60<<20 {
		t.Fatalf("known-zero covers %d bytes of a 64 MiB file with two written blocks", total)
	}
}

// A machine moved back and forth keeps a destination name of the same
// length: an earlier migration's suffix is replaced, not extended.
func TestDestinationNameDoesNotGrow(t *testing.T) {
	var o Ops
	first := o.DestinationName(&fsm.Migration{ID: "mig-0123abcd-ffff", Volume: "vol1"})
	if first != "vol1-0123abcd" {
		t.Fatalf("first destination %q, want vol1-0123abcd", first)
	}
	back := o.DestinationName(&fsm.Migration{ID: "mig_89abcdef", Volume: first})
	if back != "vol1-89abcdef" {
		t.Fatalf("second destination %q, want vol1-89abcdef", back)
	}
	if got := o.DestinationName(&fsm.Migration{ID: "mig-1", Volume: "my-volume"}); got != "my-volume-1" {
		t.Fatalf("a volume whose name has a dash: %q", got)
	}
}
