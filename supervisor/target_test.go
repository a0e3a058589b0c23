package supervisor

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/machine"
	"github.com/ferry-dev/ferry/netrewrite"
)

// machineStore is a unit-test store holding one machine.
type machineStore struct {
	Store
	m *fsm.Machine
}

func (s machineStore) GetWorker(_ context.Context, name string) (*fsm.Worker, error) {
	return &fsm.Worker{Name: name, Address: "fd00::" + name}, nil
}

func (s machineStore) GetMachine(_ context.Context, id string) (*fsm.Machine, error) {
	if s.m == nil || s.m.ID != id {
		return nil, errors.New("no such machine")
	}
	return s.m, nil
}

// attachNet records the addresses machines are attached at.
type attachNet struct {
	Network
	at  map[string]netrewrite.Addr
	did []string
}

func (n *attachNet) Detach(_ context.Context, machine string) error {
	n.did = append(n.did, "detach "+machine)
	return nil
}
func (n *attachNet) MapOld(_ context.Context, machine string, old, new netrewrite.Addr) error {
	n.did = append(n.did, "map "+machine+" "+old.String()+" "+new.String())
	return nil
}
func (n *attachNet) UnmapOld(_ context.Context, machine string, old netrewrite.Addr) error {
	n.did = append(n.did, "unmap "+machine+" "+old.String())
	return nil
}
func (n *attachNet) ForwardOld(_ context.Context, machine string, old, new netrewrite.Addr, via string) error {
	n.did = append(n.did, "forward "+machine+" "+old.String()+" "+new.String()+" via "+via)
	return nil
}

func (n *attachNet) Attach(_ context.Context, machine string, addr netrewrite.Addr) (string, error) {
	n.at[machine] = addr
	return "ns-" + machine, nil
}
func (n *attachNet) Namespace(machine string) string { return "ns-" + machine }

func TestAttachArrivingTakesThisWorkersHostPart(t *testing.T) {
	old := netrewrite.MustBuild(9, 1, 7)
	store := machineStore{m: &fsm.Machine{ID: "m1", Addr6PN: old.String()}}
	net := &attachNet{at: map[string]netrewrite.Addr{}}
	s := New(zerolog.Nop(), Config{Worker: "w2"}, store, nil, nil, nil, net)
	arr, err := s.AttachArriving(context.Background(), "m1", 2)
	if err != nil {
		t.Fatal(err)
	}
	want := netrewrite.MustBuild(9, 2, 7)
	if arr.Machine.ID != "m1" || arr.NetNS != "ns-m1" || arr.Old != old || arr.New != want || net.at["m1"] != want {
		t.Fatalf("arrival %+v, attached at %v; want ns-m1, old %v, new %v attached", arr, net.at["m1"], old, want)
	}

	// Without a machine network (or an address) nothing is attached.
	s = New(zerolog.Nop(), Config{Worker: "w2"}, store, nil, nil, nil, nil)
	if arr, err := s.AttachArriving(context.Background(), "m1", 2); err != nil || arr.NetNS != "" || arr.New.IsValid() || arr.Machine == nil {
		t.Fatalf("without a network: %+v, %v", arr, err)
	}
	store.m.Addr6PN = "not-an-address"
	s = New(zerolog.Nop(), Config{Worker: "w2"}, store, nil, nil, nil, net)
	if _, err := s.AttachArriving(context.Background(), "m1", 2); err == nil {
		t.Fatal("a machine with an unreadable 6PN address was attached")
	}
	if _, err := s.AttachArriving(context.Background(), "m9", 2); err == nil {
		t.Fatal("an unknown machine was attached")
	}
}

// stoppedDriver is a unit-test driver whose machines do not run.
type stoppedDriver struct{ stiffDriver }

func (d stoppedDriver) Status(context.Context, machine.Spec) (machine.State, error) {
	return machine.Stopped, nil
}

func TestEnsureRunningStartsOnlyAMachineAssignedHere(t *testing.T) {
	cases := []struct {
		name    string
		m       fsm.Machine
		drv     func(*opLog) Driver
		started bool
	}{
		{"assigned here, not running", fsm.Machine{ID: "m1", Worker: "w1", State: fsm.MachineRunning},
			func(l *opLog) Driver { return stoppedDriver{stiffDriver{log: l}} }, true},
		{"assigned here, running", fsm.Machine{ID: "m1", Worker: "w1", State: fsm.MachineRunning},
			func(l *opLog) Driver { return stiffDriver{log: l} }, false},
		{"assigned elsewhere", fsm.Machine{ID: "m1", Worker: "w2", State: fsm.MachineRunning},
			func(l *opLog) Driver { return stoppedDriver{stiffDriver{log: l}} }, false},
		{"recorded stopped", fsm.Machine{ID: "m1", Worker: "w1", State: fsm.MachineStopped},
			func(l *opLog) Driver { return stoppedDriver{stiffDriver{log: l}} }, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ops := &opLog{}
			m := c.m
			s := New(zerolog.Nop(), Config{Worker: "w1"}, machineStore{m: &m}, c.drv(ops), deadBackend{log: ops}, nil, nil)
			started, err := s.EnsureRunning(context.Background(), "m1")
			if err != nil || started != c.started {
				t.Fatalf("EnsureRunning = %v, %v; want %v, nil", started, err, c.started)
			}
			if did := ops.got(); c.started != slices.Contains(did, "start m1") {
				t.Fatalf("driver did %q", did)
			}
		})
	}
}

func TestMachineNetworkMovesAtCutover(t *testing.T) {
	old, nw := netrewrite.MustBuild(9, 1, 7), netrewrite.MustBuild(9, 2, 7)
	ctx := context.Background()
	net := &attachNet{at: map[string]netrewrite.Addr{}}
	s := New(zerolog.Nop(), Config{Worker: "w1"}, machineStore{}, nil, nil, nil, net)
	if err := s.MapOld(ctx, Arrival{Machine: &fsm.Machine{ID: "m1"}}); err != nil {
		t.Fatal(err)
	}
	if err := s.MapOld(ctx, Arrival{Machine: &fsm.Machine{ID: "m1"}, NetNS: "ns-m1", Old: old, New: nw}); err != nil {
		t.Fatal(err)
	}
	if err := s.ForwardDeparted(ctx, "m1", "", nw.String(), "w2"); err != nil {
		t.Fatal(err)
	}
	if err := s.ForwardDeparted(ctx, "m1", old.String(), nw.String(), "w2"); err != nil {
		t.Fatal(err)
	}
	if err := s.Detach(ctx, "m1"); err != nil {
		t.Fatal(err)
	}
	want := []string{"map m1 " + old.String() + " " + nw.String(), "detach m1", "forward m1 " + old.String() + " " + nw.String() + " via fd00::w2", "detach m1"}
	if !slices.Equal(net.did, want) {
		t.Fatalf("network did %q, want %q (nothing for a machine without a namespace or an old address)", net.did, want)
	}
	if err := s.ForwardDeparted(ctx, "m1", old.String(), "", "w2"); err == nil {
		t.Fatal("forwarded to a migration's missing new address")
	}
	// Machines sharing the host's network: nothing to move.
	s = New(zerolog.Nop(), Config{Worker: "w1"}, machineStore{}, nil, nil, nil, nil)
	if err := s.ForwardDeparted(ctx, "m1", old.String(), nw.String(), "w2"); err != nil {
		t.Fatal(err)
	}
	if err := s.Detach(ctx, "m1"); err != nil {
		t.Fatal(err)
	}
}

// A rolled-back arrival unmaps the old address its build mapped; a machine
// without a 6PN address has nothing to unmap, and a bad one is refused.
func TestUnmapArriving(t *testing.T) {
	old := netrewrite.MustBuild(9, 1, 7)
	ctx := context.Background()
	net := &attachNet{at: map[string]netrewrite.Addr{}}
	s := New(zerolog.Nop(), Config{Worker: "w1"}, machineStore{}, nil, nil, nil, net)
	if err := s.UnmapArriving(ctx, &fsm.Machine{ID: "m0"}); err != nil {
		t.Fatal(err)
	}
	if err := s.UnmapArriving(ctx, &fsm.Machine{ID: "m1", Addr6PN: old.String()}); err != nil {
		t.Fatal(err)
	}
	if err := s.UnmapArriving(ctx, &fsm.Machine{ID: "m2", Addr6PN: "not-an-address"}); err == nil {
		t.Fatal("a machine with a malformed 6PN address was unmapped")
	}
	if want := []string{"unmap m1 " + old.String()}; !slices.Equal(net.did, want) {
		t.Fatalf("network did %q, want %q", net.did, want)
	}
	if err := New(zerolog.Nop(), Config{Worker: "w1"}, machineStore{}, nil, nil, nil, nil).UnmapArriving(ctx, &fsm.Machine{ID: "m1", Addr6PN: old.String()}); err != nil {
		t.Fatalf("without a network: %v", err)
	}
}
