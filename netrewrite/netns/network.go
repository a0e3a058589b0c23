// Package netns puts machines on the 6PN with netrewrite, one network
// namespace per machine, and keeps the records a restarted agent needs.
package netns

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/atomicfile"
	"github.com/ferry-dev/ferry/netrewrite"
)

// Network puts machines on the 6PN with netrewrite: each machine gets a
// network namespace joined to this worker's namespace by a veth. At cutover
// the target gives the machine its new address and keeps the old one
// answering; the source routes the old one to the target. Both mappings
// expire after Grace.
type Network struct {
	Log    zerolog.Logger
	Worker string
	Dir    string // DataDir/net: machine records and mapping records
	Grace  time.Duration
}

type machineNetRecord struct {
	Net netrewrite.MachineNet `json:"net"`
}

func (n *Network) nsName(machine string) string { return Name(n.Worker, machine) }

// Namespace is the network namespace of machine on this worker.
func (n *Network) Namespace(machine string) string { return n.nsName(machine) }

// Name is the network namespace of a machine on a worker; it includes the
// worker so two workers on one host never collide.
func Name(worker, machine string) string { return "fm-" + worker + "-" + machine }
func (n *Network) recPath(machine string) string {
	return filepath.Join(n.Dir, "machines", machine+".json")
}
func (n *Network) mappings() netrewrite.Store {
	return netrewrite.Store{Dir: filepath.Join(n.Dir, "mappings")}
}

func (n *Network) record(mn netrewrite.MachineNet) error {
	if err := os.MkdirAll(filepath.Dir(n.recPath("x")), 0o700); err != nil {
		return err
	}
	b, _ := json.Marshal(machineNetRecord{Net: mn})
	path := n.recPath(machineFromNS(n.Worker, mn.MachineNS))
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, b) {
		// Already recorded (the target attaches while it builds the clone
		// and again at cutover): a rewrite's fsync would only lengthen
		// the machine's pause.
		return nil
	}
	return atomicfile.WriteFile(path, b, 0o600)
}

func machineFromNS(worker, ns string) string { return ns[len("fm-"+worker+"-"):] }

// Attach creates the machine's namespace with addr. Idempotent.
func (n *Network) Attach(ctx context.Context, machine string, addr netrewrite.Addr) (string, error) {
	mn := netrewrite.MachineNet{MachineNS: n.nsName(machine), Addr: addr}
	if err := n.record(mn); err != nil { // recorded first: Detach can always find it
		return "", err
	}
	if err := netrewrite.SetupMachineNet(ctx, n.Log, mn); err != nil {
		return "", err
	}
	return mn.MachineNS, nil
}

// Detach removes the machine's namespace (its veth and routes go with it).
func (n *Network) Detach(ctx context.Context, machine string) error {
	b, err := os.ReadFile(n.recPath(machine))
	if errors.Is(err, os.ErrNotExist) {
		if netrewrite.NamespaceExists(n.nsName(machine)) {
			return netrewrite.DeleteNamespace(n.nsName(machine))
		}
		return nil
	}
	if err != nil {
		return err
	}
	var rec machineNetRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return fmt.Errorf("machine network record of %s: %w", machine, err)
	}
	if err := netrewrite.TeardownMachineNet(ctx, n.Log, rec.Net); err != nil {
		return err
	}
	return os.Remove(n.recPath(machine))
}

// MapOld, on the target: the machine (already at new) also answers old.
func (n *Network) MapOld(ctx context.Context, machine string, old, new netrewrite.Addr) error {
	plan := netrewrite.TargetPlan{Machine: netrewrite.MachineNet{MachineNS: n.nsName(machine), Addr: new}, Old: old}
	m, err := netrewrite.NewMapping(machine, plan, nil, time.Now(), n.grace())
	if err != nil {
		return err
	}
	if err := n.mappings().Put(m); err != nil {
		return err
	}
	return netrewrite.CutoverTarget(ctx, n.Log, plan)
}

// UnmapOld rolls back what MapOld made here for machine at old, when a
// migration here rolled back before its cutover (the target maps the old
// address while it builds the clone): the kernel state, then the record's
// target side (Store.RollbackTarget). Nothing when there is no record or
// it is another machine's. Idempotent.
func (n *Network) UnmapOld(ctx context.Context, machine string, old netrewrite.Addr) error {
	m, ok, err := n.mappings().Get(old)
	if err != nil || !ok || m.Machine != machine || m.Target == nil {
		return err
	}
	return n.mappings().RollbackTarget(ctx, n.Log, *m.Target)
}

// ForwardOld, on the source: route old to the target worker.
func (n *Network) ForwardOld(ctx context.Context, machine string, old, new netrewrite.Addr, via string) error {
	viaIP, err := netip.ParseAddr(via)
	if err != nil {
		return fmt.Errorf("target worker address %q: %w", via, err)
	}
	sp := netrewrite.SourcePlan{Machine: netrewrite.MachineNet{MachineNS: n.nsName(machine), Addr: old}, Via: viaIP}
	m := netrewrite.Mapping{Machine: machine, Old: old, New: new, Until: time.Now().Add(n.grace()).UTC(), Source: &sp}
	if err := n.mappings().Put(m); err != nil {
		return err
	}
	return netrewrite.CutoverSource(ctx, n.Log, sp)
}

func (n *Network) grace() time.Duration {
	if n.Grace <= 0 {
		return 10 * time.Minute
	}
	return n.Grace
}

// ExpireLoop removes mappings whose grace period ended, until ctx ends.
func (n *Network) ExpireLoop(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		if _, err := n.mappings().ExpireDue(ctx, n.Log, time.Now()); err != nil {
			n.Log.Warn().Err(err).Msg("expire 6PN mappings")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
