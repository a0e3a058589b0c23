package api

import (
	"context"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// AgentClient adapts the API client to what the agent needs (its
// ControlPlane): volumes and machines as pointers, leases from LeaseTTL, and
// every 4xx answer as a *fsm.Refusal, which the agent treats as "the store
// moved on" rather than a transport failure.
type AgentClient struct {
	C        *Client
	LeaseTTL time.Duration // 0: the server's default
	// Report, when set, gives the capacity sent with each heartbeat (free
	// space of the volume store, slots, rates) for the servers' placement.
	Report func() *fsm.WorkerReport
}

func (p *AgentClient) RegisterWorker(ctx context.Context, w fsm.Worker) error {
	_, err := p.C.RegisterWorker(ctx, w, p.LeaseTTL)
	return refusal(err)
}

func (p *AgentClient) Heartbeat(ctx context.Context, worker string) error {
	var rep *fsm.WorkerReport
	if p.Report != nil {
		rep = p.Report()
	}
	_, err := p.C.HeartbeatReport(ctx, worker, p.LeaseTTL, rep)
	return refusal(err)
}

func (p *AgentClient) WatchMigrations(ctx context.Context, worker string, index uint64) ([]*fsm.Migration, uint64, error) {
	ms, idx, err := p.C.WatchMigrations(ctx, worker, index)
	return ms, idx, refusal(err)
}

func (p *AgentClient) GetMigration(ctx context.Context, id string) (*fsm.Migration, error) {
	v, err := p.C.GetMigration(ctx, id)
	return v, refusal(err)
}

func (p *AgentClient) Propose(ctx context.Context, id string, ev fsm.Event, stepID string, pl fsm.EventPayload) (*fsm.Migration, error) {
	v, err := p.C.Propose(ctx, id, ev, stepID, pl)
	return v, refusal(err)
}

func (p *AgentClient) GetVolume(ctx context.Context, id string) (*fsm.Volume, error) {
	v, err := p.C.GetVolume(ctx, id)
	return v, refusal(err)
}

func (p *AgentClient) ListVolumes(ctx context.Context, worker string) ([]*fsm.Volume, error) {
	vs, err := p.C.ListVolumes(ctx, worker)
	out := make([]*fsm.Volume, len(vs))
	for i := range vs {
		out[i] = &vs[i]
	}
	return out, refusal(err)
}

func (p *AgentClient) CreateVolume(ctx context.Context, v fsm.Volume) (*fsm.Volume, error) {
	created, err := p.C.CreateVolume(ctx, v)
	return created, refusal(err)
}

func (p *AgentClient) UpdateVolume(ctx context.Context, c fsm.UpdateVolumeCmd) error {
	_, err := p.C.UpdateVolume(ctx, c.ID, VolumeUpdate{State: c.State, AttachedMachine: c.AttachedMachine, Layout: c.Layout, Size: c.Size})
	return refusal(err)
}

// ForksFrom lists the forks to other workers whose copy worker makes or serves.
func (p *AgentClient) ForksFrom(ctx context.Context, worker string) ([]*fsm.Volume, error) {
	vs, err := p.C.ForksFrom(ctx, worker)
	out := make([]*fsm.Volume, len(vs))
	for i := range vs {
		out[i] = &vs[i]
	}
	return out, refusal(err)
}

func (p *AgentClient) ServeFork(ctx context.Context, c fsm.ForkServeCmd) error {
	_, err := p.C.ServeFork(ctx, c.ID, ForkServe{Layout: c.Layout, Export: c.Export, KnownZero: c.KnownZero, Released: c.Released})
	return refusal(err)
}

func (p *AgentClient) GetMachine(ctx context.Context, id string) (*fsm.Machine, error) {
	v, err := p.C.GetMachine(ctx, id)
	return v, refusal(err)
}

func (p *AgentClient) ListMachines(ctx context.Context, worker string) ([]*fsm.Machine, error) {
	ms, err := p.C.ListMachines(ctx, worker)
	out := make([]*fsm.Machine, len(ms))
	for i := range ms {
		out[i] = &ms[i]
	}
	return out, refusal(err)
}

func (p *AgentClient) UpdateMachine(ctx context.Context, c fsm.UpdateMachineCmd) error {
	_, err := p.C.UpdateMachine(ctx, c.ID, MachineUpdate{State: c.State, Volume: c.Volume, Addr6PN: c.Addr6PN, Spec: c.Spec})
	return refusal(err)
}

func (p *AgentClient) GetWorker(ctx context.Context, name string) (*fsm.Worker, error) {
	v, err := p.C.GetWorker(ctx, name)
	return v, refusal(err)
}

func (p *AgentClient) PutEnvelopes(ctx context.Context, volume string, envs []fsm.Envelope) error {
	_, err := p.C.PutEnvelopes(ctx, volume, envs)
	return refusal(err)
}

func (p *AgentClient) Envelope(ctx context.Context, volume string, purpose fsm.Purpose) (*fsm.Envelope, error) {
	e, err := p.C.GetEnvelope(ctx, volume, purpose, 0)
	return e, refusal(err)
}

func (p *AgentClient) SetWorkerKey(ctx context.Context, worker string, k fsm.PublicKey) error {
	_, err := p.C.SetWorkerKey(ctx, worker, k)
	return refusal(err)
}

func (p *AgentClient) RecoveryKey(ctx context.Context) (*fsm.PublicKey, error) {
	k, err := p.C.RecoveryKey(ctx)
	return k, refusal(err)
}

// refusal is the identity: api.Error is fsm.Refusal, and the agent tells a
// refusal (a client-side kind) from a retryable failure by its kind.
func refusal(err error) error { return err }
