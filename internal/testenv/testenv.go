// Package testenv decides what a test does when the machine lacks something
// it needs (root, a tool, a device, a kernel feature): skip on a developer's
// machine, fail in strict mode, so that a CI run cannot go green with the
// real tests skipped.
//
// Strict mode is on when FERRY_REQUIRE=all, or when CI=true and FERRY_REQUIRE
// is unset; FERRY_REQUIRE=none turns it off even in CI.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// Strict reports whether a missing environment piece fails the test.
func Strict() bool {
	switch os.Getenv("FERRY_REQUIRE") {
	case "all":
		return true
	case "none":
		return false
	case "":
		return os.Getenv("CI") == "true"
	}
	// An unknown value is a typo in a CI script; failing is the safe reading.
	return true
}

// Require skips t (or fails it in strict mode) unless ok, naming what is
// missing and how to get it, e.g. "tgtd: apt-get install tgt".
func Require(t testing.TB, what string, ok bool) {
	t.Helper()
	if ok {
		return
	}
	if Strict() {
		t.Fatalf("needs %s (strict mode: FERRY_REQUIRE=all or CI=true turns this skip into a failure)", what)
	}
	t.Skipf("needs %s", what)
}

// Root requires euid 0; why says what the test does with it.
func Root(t testing.TB, why string) {
	t.Helper()
	Require(t, "root ("+why+")", os.Geteuid() == 0)
}

// Tools requires every named executable on PATH; hint says how to install
// them.
func Tools(t testing.TB, hint string, names ...string) {
	t.Helper()
	for _, n := range names {
		_, err := exec.LookPath(n)
		Require(t, n+": "+hint, err == nil)
	}
}

// Paths requires every named file or device node to exist; hint says how to
// make it appear.
func Paths(t testing.TB, hint string, paths ...string) {
	t.Helper()
	for _, p := range paths {
		_, err := os.Stat(p)
		Require(t, p+": "+hint, err == nil)
	}
}

// InGuest reports whether the test runs inside the VM that
// integration/vm boots (FERRY_IN_VM=1).
func InGuest() bool { return os.Getenv("FERRY_IN_VM") != "" }

// Guest is for tests whose feature only the test VM's kernel provides
// (dm-clone, dm-crypt) or that only make sense in the guest: inside the VM a
// missing piece fails the test; on the host the test is skipped even in strict
// mode, because TestKernelPathInVM runs it in the guest and that test is
// itself required. Such tests are listed in scripts/skip-allow.txt.
func Guest(t testing.TB, what string, ok bool) {
	t.Helper()
	if ok {
		return
	}
	if InGuest() {
		t.Fatalf("needs %s inside the test VM", what)
	}
	t.Skipf("needs %s (the VM run, go test ./integration/vm, enforces it)", what)
}
