package supervisor

import (
	"context"
	"errors"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/netrewrite"
)

// machineStore is a unit-test store holding one machine.
type machineStore struct {
	Store
	m *fsm.Machine
}

func (s machineStore) GetMachine(_ context.Context, id string) (*fsm.Machine, error) {
	if s.m == nil || s.m.ID != id {
		return nil, errors.New("no such machine")
	}
	return s.m, nil
}

// attachNet records the addresses machines are attached at.
type attachNet struct{ at map[string]netrewrite.Addr }

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
