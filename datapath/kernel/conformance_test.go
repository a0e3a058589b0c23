package kernel

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/backendtest"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// TestMain lets the test binary double as the iSCSI export child the
// conformance suite starts.
func TestMain(m *testing.M) {
	backendtest.ServeChildren()
	os.Exit(m.Run())
}

// TestConformance runs the backend suite against the kernel data path. It
// runs inside the VM suite (integration/vm), where the guest has every
// tool: there a missing piece is a failure, and the VM suite counts a skip
// as one too. On the host it is skipped (scripts/skip-allow.txt).
func TestConformance(t *testing.T) {
	testenv.Guest(t, "the kernel data path (dm-clone, dm-crypt, open-iscsi)", testenv.InGuest())
	if err := Probe(context.Background()); err != nil {
		t.Fatal(err)
	}
	backendtest.Run(t, func(t *testing.T, dir string) datapath.Backend {
		// Silent: a backend standing for an agent that restarted leaves its
		// clone poller running in this process.
		return &Backend{DataDir: dir, Log: zerolog.Nop(), Loops: loopdev.System{}, FastKDF: true,
			ISCSI: &OpenISCSI{Log: zerolog.Nop()}, PollInterval: 100 * time.Millisecond, StallAfter: 5 * time.Second}
	})
}
