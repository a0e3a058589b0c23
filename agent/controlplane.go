package agent

import (
	"context"
	"errors"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// APIControlPlane adapts the server's API client to what the agent needs.
type APIControlPlane struct {
	C        *api.Client
	LeaseTTL time.Duration // 0: the server's default
	// Report, when set, gives the capacity sent with each heartbeat (free
	// space of the volume store, slots, rates) for the servers' placement.
	Report func() *fsm.WorkerReport
}

var _ ControlPlane = (*APIControlPlane)(nil)

func (p *APIControlPlane) RegisterWorker(ctx context.Context, w fsm.Worker) error {
	_, err := p.C.RegisterWorker(ctx, w, p.LeaseTTL)
	return err
}

func (p *APIControlPlane) Heartbeat(ctx context.Context, worker string) error {
	var rep *fsm.WorkerReport
	if p.Report != nil {
		rep = p.Report()
	}
	_, err := p.C.HeartbeatReport(ctx, worker, p.LeaseTTL, rep)
	return err
}

func (p *APIControlPlane) WatchMigrations(ctx context.Context, worker string, index uint64) ([]*fsm.Migration, uint64, error) {
	return p.C.WatchMigrations(ctx, worker, index)
}

func (p *APIControlPlane) GetMigration(ctx context.Context, id string) (*fsm.Migration, error) {
	return p.C.GetMigration(ctx, id)
}

func (p *APIControlPlane) Propose(ctx context.Context, id string, ev fsm.Event, stepID string, pl fsm.EventPayload) (*fsm.Migration, error) {
	return p.C.Propose(ctx, id, ev, stepID, pl)
}

func (p *APIControlPlane) GetVolume(ctx context.Context, id string) (*fsm.Volume, error) {
	return p.C.GetVolume(ctx, id)
}

func (p *APIControlPlane) ListVolumes(ctx context.Context, worker string) ([]*fsm.Volume, error) {
	vs, err := p.C.ListVolumes(ctx, worker)
	out := make([]*fsm.Volume, len(vs))
	for i := range vs {
		out[i] = &vs[i]
	}
	return out, err
}

func (p *APIControlPlane) CreateVolume(ctx context.Context, v fsm.Volume) (*fsm.Volume, error) {
	return p.C.CreateVolume(ctx, v)
}

func (p *APIControlPlane) UpdateVolume(ctx context.Context, c fsm.UpdateVolumeCmd) error {
	_, err := p.C.UpdateVolume(ctx, c.ID, api.VolumeUpdate{State: c.State, AttachedMachine: c.AttachedMachine, Layout: c.Layout, Size: c.Size})
	return err
}

func (p *APIControlPlane) GetMachine(ctx context.Context, id string) (*fsm.Machine, error) {
	return p.C.GetMachine(ctx, id)
}

func (p *APIControlPlane) ListMachines(ctx context.Context, worker string) ([]*fsm.Machine, error) {
	ms, err := p.C.ListMachines(ctx, worker)
	out := make([]*fsm.Machine, len(ms))
	for i := range ms {
		out[i] = &ms[i]
	}
	return out, err
}

func (p *APIControlPlane) UpdateMachine(ctx context.Context, c fsm.UpdateMachineCmd) error {
	_, err := p.C.UpdateMachine(ctx, c.ID, api.MachineUpdate{State: c.State, Volume: c.Volume, Addr6PN: c.Addr6PN, Spec: c.Spec})
	return err
}

func (p *APIControlPlane) GetWorker(ctx context.Context, name string) (*fsm.Worker, error) {
	return p.C.GetWorker(ctx, name)
}

func (p *APIControlPlane) SetVolumeKey(ctx context.Context, volume string, key []byte) error {
	return p.C.SetVolumeKey(ctx, volume, key)
}

func (p *APIControlPlane) VolumeKey(ctx context.Context, volume string) ([]byte, error) {
	return p.C.GetVolumeKey(ctx, volume)
}

// isRefusal reports whether err is the store refusing a proposal (state
// moved on, guard failed) rather than a transport failure.
func isRefusal(err error) bool {
	var r *fsm.Refusal // also what the client returns (api.Error)
	return errors.As(err, &r) && r.Kind.ClientSide()
}
