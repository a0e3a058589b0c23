package netns

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/netrewrite"
)

func TestNetworkRecordsBeforeApplying(t *testing.T) {
	n := &Network{Worker: "w1", Dir: t.TempDir()}
	mn := netrewrite.MachineNet{MachineNS: Name("w1", "m1")}
	if err := n.record(mn); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(n.recPath("m1")); err != nil {
		t.Fatalf("machine network record not at %s: %v", n.recPath("m1"), err)
	}
}

// A rolled-back target unmaps the old address it mapped for its machine:
// the kernel state and the record. Another machine's record stays; one
// that carries a source plan too (a one-host demo) keeps that side.
func TestUnmapOldRemovesOnlyThisMachinesTargetMapping(t *testing.T) {
	testenv.Require(t, "root (CAP_NET_ADMIN, CAP_SYS_ADMIN) for network namespaces", os.Geteuid() == 0 && netrewrite.CheckPrivileges() == nil)
	worker := fmt.Sprintf("fmt-unmap-%d", os.Getpid())
	if err := netrewrite.EnsureNamespace(worker); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netrewrite.DeleteNamespace(worker) })
	n := &Network{Log: zerolog.Nop(), Worker: "w1", Dir: t.TempDir()}
	ctx := context.Background()
	record := func(machine string, old netrewrite.Addr, src bool) {
		t.Helper()
		plan := netrewrite.TargetPlan{Machine: netrewrite.MachineNet{WorkerNS: worker, MachineNS: n.nsName(machine), Addr: netrewrite.MustBuild(9, 2, 7)}, Old: old}
		var sp *netrewrite.SourcePlan
		if src {
			sp = &netrewrite.SourcePlan{Machine: netrewrite.MachineNet{WorkerNS: worker, MachineNS: n.nsName(machine), Addr: old}}
		}
		m, err := netrewrite.NewMapping(machine, plan, sp, time.Now(), time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if err := n.mappings().Put(m); err != nil {
			t.Fatal(err)
		}
	}
	mine, others, shared := netrewrite.MustBuild(9, 1, 7), netrewrite.MustBuild(9, 1, 8), netrewrite.MustBuild(9, 1, 9)
	record("m1", mine, false)
	record("m2", others, false)
	record("m1", shared, true)
	for range 2 { // idempotent
		for _, old := range []netrewrite.Addr{mine, others, shared, netrewrite.MustBuild(9, 1, 10)} {
			if err := n.UnmapOld(ctx, "m1", old); err != nil {
				t.Fatalf("unmap %s: %v", old, err)
			}
		}
	}
	for old, want := range map[netrewrite.Addr]bool{mine: false, others: true, shared: true} {
		if _, ok, err := n.mappings().Get(old); err != nil || ok != want {
			t.Fatalf("record of %s kept = %v (%v), want %v", old, ok, err, want)
		}
	}
	if m, _, _ := n.mappings().Get(others); m.Target == nil {
		t.Fatal("another machine's mapping lost its target side")
	}
	if m, _, _ := n.mappings().Get(shared); m.Target != nil || m.Source == nil {
		t.Fatalf("the shared record kept target %v and source %v; want only its source side", m.Target, m.Source)
	}
}
