package datapath

import (
	"context"
	"errors"
	"strings"
	"testing"
)

type named struct {
	Backend
	name string
}

func TestSelect(t *testing.T) {
	ok := func(context.Context) error { return nil }
	no := func(context.Context) error { return errors.New("lacks x") }
	mk := func(n string) func() Backend { return func() Backend { return named{name: n} } }
	cands := []Candidate{
		{Name: "kernel", Probe: ok, AutoProbe: no, New: mk("kernel")},
		{Name: "userspace", Probe: ok, New: mk("userspace")},
	}
	ctx := context.Background()
	for want, got := range map[string]string{"auto": "userspace", "kernel": "kernel", "userspace": "userspace"} {
		b, err := Select(ctx, want, cands)
		if err != nil || b.(named).name != got {
			t.Fatalf("Select(%q) = %v, %v; want %s", want, b, err, got)
		}
	}
	if _, err := Select(ctx, "zfs", cands); err == nil || !strings.Contains(err.Error(), "kernel, userspace") {
		t.Fatalf("an unknown backend: %v", err)
	}
	cands[0].Probe = no
	if _, err := Select(ctx, "kernel", cands); err == nil || !strings.Contains(err.Error(), "lacks x") {
		t.Fatalf("a named backend whose probe fails: %v, want the probe's reason", err)
	}
	cands[1].Probe = no
	if _, err := Select(ctx, "auto", cands); err == nil || !strings.Contains(err.Error(), "userspace: lacks x") {
		t.Fatalf("auto with no backend passing: %v", err)
	}
}
