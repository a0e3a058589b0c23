package userspace

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/backendtest"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// TestMain lets the test binary double as the two children the suite
// starts: ferry's iSCSI export and `ferry volume serve`.
func TestMain(m *testing.M) {
	backendtest.ServeChildren()
	ServeChildIfAsked()
	os.Exit(m.Run())
}

// TestConformance runs the backend suite on the host. It needs root, FUSE,
// loop devices, cryptsetup and mkfs.ext4; without them it skips naming what
// is missing, unless in strict mode (internal/testenv), where that fails.
func TestConformance(t *testing.T) {
	err := hostReady()
	testenv.Require(t, fmt.Sprint(err), err == nil)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	backendtest.Run(t, func(t *testing.T, dir string) datapath.Backend {
		return &Backend{DataDir: dir, Exe: exe, Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
			Loops: loopdev.System{}, FastKDF: true}
	})
}

// TestAbandonSourceGone: the userspace backend fails the writeback a
// clone can no longer serve instead of waiting out the source's timeouts.
func TestAbandonSourceGone(t *testing.T) {
	err := hostReady()
	testenv.Require(t, fmt.Sprint(err), err == nil)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	backendtest.RunAbandonSourceGone(t, func(t *testing.T, dir string) datapath.Backend {
		return &Backend{DataDir: dir, Exe: exe, Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
			Loops: loopdev.System{}, FastKDF: true}
	})
}

func hostReady() error {
	if os.Geteuid() != 0 {
		return errNeeds("root (loop devices and mounts)")
	}
	if err := Probe(context.Background()); err != nil {
		return err
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		return errNeeds("/dev/loop-control")
	}
	if _, err := exec.LookPath("fusermount3"); err != nil {
		return errNeeds("fusermount3 (Debian package fuse3)")
	}
	return nil
}

type errNeeds string

func (e errNeeds) Error() string { return "the userspace backend suite needs " + string(e) }
