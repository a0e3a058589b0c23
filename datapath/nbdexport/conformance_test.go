package nbdexport_test

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/backendtest"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// TestMain lets the test binary double as the children the conformance
// suite starts: ferry's iSCSI export and `ferry volume serve`.
func TestMain(m *testing.M) {
	backendtest.ServeChildren()
	userspace.ServeChildIfAsked()
	os.Exit(m.Run())
}

// TestKernelConformanceNBD runs the backend suite on the userspace data path
// with the NBD block export: the clone engine (and copy-on-write layer)
// in ferry's process, served as /dev/nbdN, kernel dm-crypt and ext4 over
// it — what --block-export auto picks on a kernel from 6.13 on with NBD
// and dm-crypt but no dm-clone, and --block-export nbd on Debian 12's.
// Only the test VM has such a kernel.
func TestKernelConformanceNBD(t *testing.T) {
	err := userspace.ProbeNBD(context.Background())
	testenv.Guest(t, fmt.Sprintf("root and the NBD block export (%v)", err), err == nil && os.Geteuid() == 0)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	backendtest.Run(t, func(t *testing.T, dir string) datapath.Backend {
		return &userspace.Backend{DataDir: dir, Exe: exe, Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
			Loops: loopdev.System{}, FastKDF: true, BlockExport: userspace.ExportNBD}
	})
}
