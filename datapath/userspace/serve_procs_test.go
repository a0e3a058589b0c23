package userspace

import (
	"runtime"
	"testing"
)

func TestServeProcs(t *testing.T) {
	t.Setenv("GOMAXPROCS", "")
	if n := ServeProcs(); n < MinServeProcs || n < runtime.NumCPU() {
		t.Fatalf("ServeProcs() = %d, want at least %d and the %d cores", n, MinServeProcs, runtime.NumCPU())
	}
	t.Setenv("GOMAXPROCS", "3") // the operator's choice stands
	if n := ServeProcs(); n != 0 {
		t.Fatalf("ServeProcs() with GOMAXPROCS set = %d, want 0 (leave it)", n)
	}
}
