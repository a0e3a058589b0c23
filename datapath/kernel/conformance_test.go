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
// as one too. On the host it runs only when FERRY_REQUIRE asks for it.
func TestConformance(t *testing.T) {
	if os.Getenv("FERRY_IN_VM") == "" && os.Getenv("FERRY_REQUIRE") == "" {
		t.Skip("runs inside the VM that integration/vm's TestKernelPathInVM boots (or set FERRY_REQUIRE=1 on a host with dm-clone and open-iscsi)")
	}
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
