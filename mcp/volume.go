package mcp

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// ---- volume create ----

// VolumeCreateIn asks for a plan of a new volume.
type VolumeCreateIn struct {
	ID     string `json:"id" jsonschema:"the new volume's id (no spaces, slashes, ?, # or %)"`
	Worker string `json:"worker" jsonschema:"the worker that will hold it"`
	Size   string `json:"size" jsonschema:"e.g. 512M, 10G (binary units)"`
}

type volumeCreateParams struct {
	ID        string `json:"id"`
	Worker    string `json:"worker"`
	SizeBytes int64  `json:"size_bytes"`
}

// VolumeCreateDetails is what a volume create plan rests on.
type VolumeCreateDetails struct {
	Volume      string `json:"volume"`
	Worker      string `json:"worker"`
	SizeBytes   int64  `json:"size_bytes"`
	WorkerAlive bool   `json:"worker_alive" jsonschema:"its agent heartbeats, so it will format the volume"`
}

func validID(id string) bool {
	return id != "" && len(id) <= 128 && !strings.ContainsAny(id, "/ \t\n?#%")
}

func (s *Server) volumeCreatePlan(ctx context.Context, in VolumeCreateIn) (Plan[VolumeCreateDetails], error) {
	n, err := parseSize(in.Size)
	if err != nil {
		return Plan[VolumeCreateDetails]{}, err
	}
	return makePlan(ctx, s, "volume_create", volumeCreateParams{ID: in.ID, Worker: in.Worker, SizeBytes: n}, s.planVolumeCreate)
}

func (s *Server) planVolumeCreate(ctx context.Context, p volumeCreateParams) ([]string, VolumeCreateDetails, error) {
	var d VolumeCreateDetails
	if !validID(p.ID) {
		return nil, d, fmt.Errorf("volume id %q is not valid: 1 to 128 characters, no spaces, slashes, ?, # or %%", p.ID)
	}
	if v, err := s.c.GetVolume(ctx, p.ID); err == nil {
		return nil, d, fmt.Errorf("volume %s already exists on worker %s", v.ID, v.Worker)
	} else if !notFound(err) {
		return nil, d, err
	}
	w, err := s.c.GetWorker(ctx, p.Worker)
	if err != nil {
		return nil, d, err
	}
	d = VolumeCreateDetails{Volume: p.ID, Worker: w.Name, SizeBytes: p.SizeBytes, WorkerAlive: w.Alive(time.Now())}
	changes := []string{
		fmt.Sprintf("register volume %s on worker %s, %s (%d bytes), state creating", p.ID, w.Name, humanBytes(p.SizeBytes), p.SizeBytes),
		fmt.Sprintf("store a new random key for %s on the servers (never shown)", p.ID),
		fmt.Sprintf("the agent of %s then formats it (LUKS2, ext4) and marks it created", w.Name),
	}
	if !d.WorkerAlive {
		changes = append(changes, fmt.Sprintf("note: %s has no valid lease now, so nothing formats the volume until its agent runs", w.Name))
	}
	return changes, d, nil
}

func (s *Server) volumeCreateApply(ctx context.Context, in ApplyIn) (Volume, error) {
	p, _, err := checkPlan(ctx, s, "volume_create", in.PlanToken, s.planVolumeCreate)
	if err != nil {
		return Volume{}, err
	}
	v, err := s.c.CreateVolume(ctx, fsm.Volume{ID: p.ID, Worker: p.Worker, Size: p.SizeBytes, State: fsm.VolCreating})
	if err != nil {
		return Volume{}, err
	}
	// The worker's agent makes the passphrase and seals it to itself and to
	// the recovery key; it never passes through here.
	if nv, err := s.c.GetVolume(ctx, v.ID); err == nil {
		v = nv
	}
	return volumeOut(v), nil
}

// ---- volume destroy ----

// VolumeDestroyIn asks for a plan of destroying a volume.
type VolumeDestroyIn struct {
	ID        string `json:"id"`
	Retention string `json:"retention,omitempty" jsonschema:"how long the data is kept before it is really deleted, e.g. 24h (default 24h)"`
}

type volumeDestroyParams struct {
	ID        string        `json:"id"`
	Retention time.Duration `json:"retention"`
}

// VolumeDestroyDetails is what a volume destroy plan rests on.
type VolumeDestroyDetails struct {
	Volume    string `json:"volume"`
	Worker    string `json:"worker"`
	SizeBytes int64  `json:"size_bytes"`
	State     string `json:"state" jsonschema:"its state now"`
	Outcome   string `json:"outcome" jsonschema:"pending_destroy (kept for the retention) or destroyed (retention over: data and key go)"`
	Retention string `json:"retention,omitempty"`
}

func (s *Server) volumeDestroyPlan(ctx context.Context, in VolumeDestroyIn) (Plan[VolumeDestroyDetails], error) {
	ret := fsm.DefaultDestroyRetention
	if in.Retention != "" {
		d, err := time.ParseDuration(in.Retention)
		if err != nil || d <= 0 {
			return Plan[VolumeDestroyDetails]{}, fmt.Errorf("retention %q: use a positive duration like 24h or 30m", in.Retention)
		}
		ret = d
	}
	return makePlan(ctx, s, "volume_destroy", volumeDestroyParams{ID: in.ID, Retention: ret}, s.planVolumeDestroy)
}

// planVolumeDestroy refuses what the servers would refuse, in their words:
// a volume a machine uses, one a migration holds, one still in retention.
func (s *Server) planVolumeDestroy(ctx context.Context, p volumeDestroyParams) ([]string, VolumeDestroyDetails, error) {
	var d VolumeDestroyDetails
	v, err := s.c.GetVolume(ctx, p.ID)
	if err != nil {
		return nil, d, err
	}
	m, err := s.attachedRunning(ctx, v)
	if err != nil {
		return nil, d, err
	}
	if m != nil {
		return nil, d, fmt.Errorf("volume %s is attached to machine %s (%s on %s): stop the machine and detach the volume before destroying it", v.ID, m.ID, m.State, m.Worker)
	}
	if id, err := s.lockHolder(ctx, "volume/"+v.ID); err != nil {
		return nil, d, err
	} else if id != "" {
		return nil, d, fmt.Errorf("volume %s is locked by migration %s: wait for it or abort it", v.ID, id)
	}
	d = VolumeDestroyDetails{Volume: v.ID, Worker: v.Worker, SizeBytes: v.Size, State: string(v.State)}
	var changes []string
	switch v.State {
	case fsm.VolDestroyed:
		return nil, d, fmt.Errorf("volume %s is already destroyed", v.ID)
	case fsm.VolPendingDelete:
		if time.Now().Before(v.DestroyAfter) {
			return nil, d, fmt.Errorf("volume %s is kept until %s (retention)", v.ID, v.DestroyAfter.UTC().Format(time.RFC3339))
		}
		d.Outcome = string(fsm.VolDestroyed)
		changes = []string{fmt.Sprintf("volume %s (%s on %s): pending_destroy -> destroyed; its key is deleted from the servers and its worker deletes the data", v.ID, humanBytes(v.Size), v.Worker)}
	default:
		d.Outcome, d.Retention = string(fsm.VolPendingDelete), p.Retention.String()
		changes = []string{
			fmt.Sprintf("volume %s (%s on %s): %s -> pending_destroy", v.ID, humanBytes(v.Size), v.Worker, v.State),
			fmt.Sprintf("its data and key are kept for %s after apply, then deleted; until then it can be restored", p.Retention),
		}
	}
	return changes, d, nil
}

// attachedRunning is the servers' rule for "in use": the machine the volume
// is attached to, or a running machine on its worker naming it.
func (s *Server) attachedRunning(ctx context.Context, v *fsm.Volume) (*fsm.Machine, error) {
	if v.AttachedMachine != "" {
		m, err := s.c.GetMachine(ctx, v.AttachedMachine)
		if err == nil {
			return m, nil
		}
		if !notFound(err) {
			return nil, err
		}
	}
	ms, err := s.c.ListMachines(ctx, v.Worker)
	if err != nil {
		return nil, err
	}
	for i := range ms {
		if ms[i].Volume == v.ID && ms[i].Worker == v.Worker && ms[i].State == fsm.MachineRunning {
			return &ms[i], nil
		}
	}
	return nil, nil
}

func (s *Server) volumeDestroyApply(ctx context.Context, in ApplyIn) (Volume, error) {
	p, _, err := checkPlan(ctx, s, "volume_destroy", in.PlanToken, s.planVolumeDestroy)
	if err != nil {
		return Volume{}, err
	}
	v, err := s.c.DestroyVolume(ctx, p.ID, p.Retention)
	if err != nil {
		return Volume{}, err
	}
	return volumeOut(v), nil
}
