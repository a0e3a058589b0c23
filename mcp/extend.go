package mcp

import (
	"context"
	"fmt"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// ---- volume extend ----

// VolumeExtendIn asks for a plan of growing a volume.
type VolumeExtendIn struct {
	ID   string `json:"id"`
	Size string `json:"size" jsonschema:"the new size of the whole volume, e.g. 20G (binary units); larger than now"`
}

type volumeExtendParams struct {
	ID        string `json:"id"`
	SizeBytes int64  `json:"size_bytes"`
}

// VolumeExtendDetails is what a volume extend plan rests on.
type VolumeExtendDetails struct {
	Volume          string `json:"volume"`
	Worker          string `json:"worker"`
	FromBytes       int64  `json:"from_bytes"`
	ToBytes         int64  `json:"to_bytes"`
	AttachedMachine string `json:"attached_machine,omitempty" jsonschema:"the machine that keeps running while its filesystem grows"`
}

func (s *Server) volumeExtendPlan(ctx context.Context, in VolumeExtendIn) (Plan[VolumeExtendDetails], error) {
	n, err := parseSize(in.Size)
	if err != nil {
		return Plan[VolumeExtendDetails]{}, err
	}
	return makePlan(ctx, s, "volume_extend", volumeExtendParams{ID: in.ID, SizeBytes: n}, s.planVolumeExtend)
}

// planVolumeExtend refuses what the servers would refuse, in their words: a
// shrink, a volume not created, one a migration holds, one already growing
// to another size.
func (s *Server) planVolumeExtend(ctx context.Context, p volumeExtendParams) ([]string, VolumeExtendDetails, error) {
	var d VolumeExtendDetails
	v, err := s.c.GetVolume(ctx, p.ID)
	if err != nil {
		return nil, d, err
	}
	switch {
	case p.SizeBytes <= 0 || p.SizeBytes%512 != 0:
		return nil, d, fmt.Errorf("volume %s: size %d must be a positive multiple of 512 bytes", v.ID, p.SizeBytes)
	case v.State != fsm.VolCreated:
		return nil, d, fmt.Errorf("volume %s is %s: only a created volume can be extended", v.ID, v.State)
	case p.SizeBytes < v.Size:
		return nil, d, fmt.Errorf("volume %s is %d bytes: shrinking to %d is refused (an ext4 filesystem cannot shrink online and the LUKS2 segment would lose its tail); create a smaller volume and copy the data instead", v.ID, v.Size, p.SizeBytes)
	case p.SizeBytes == v.Size:
		return nil, d, fmt.Errorf("volume %s is already %s (%d bytes): nothing to extend", v.ID, humanBytes(v.Size), v.Size)
	case v.Extending() && p.SizeBytes != v.WantSize:
		return nil, d, fmt.Errorf("volume %s is already being extended to %d bytes: wait for it (volume show), then extend again", v.ID, v.WantSize)
	}
	vs, err := s.c.ListVolumes(ctx, v.Worker)
	if err != nil {
		return nil, d, err
	}
	for _, o := range vs {
		if o.ForkOf == v.ID && o.Forking() {
			return nil, d, fmt.Errorf("volume %s is being forked into %s: extend it once the fork is created", v.ID, o.ID)
		}
	}
	if id, err := s.lockHolder(ctx, "volume/"+v.ID); err != nil {
		return nil, d, err
	} else if id != "" {
		return nil, d, fmt.Errorf("volume %s is in migration %s: extending is refused, not queued; extend it once the migration ended (or abort it)", v.ID, id)
	}
	d = VolumeExtendDetails{Volume: v.ID, Worker: v.Worker, FromBytes: v.Size, ToBytes: p.SizeBytes, AttachedMachine: v.AttachedMachine}
	changes := []string{
		fmt.Sprintf("volume %s on %s: %s -> %s (%d -> %d bytes); the servers record the request", v.ID, v.Worker, humanBytes(v.Size), humanBytes(p.SizeBytes), v.Size, p.SizeBytes),
		fmt.Sprintf("the agent of %s grows the encrypted file, the LUKS2 segment and the ext4 filesystem, then reports the new size (watch volume_show)", v.Worker),
		"until it reported, a migration of this volume is refused",
	}
	if v.AttachedMachine != "" {
		changes = append(changes, fmt.Sprintf("machine %s keeps running: its filesystem grows online", v.AttachedMachine))
	}
	return changes, d, nil
}

func (s *Server) volumeExtendApply(ctx context.Context, in ApplyIn) (Volume, error) {
	p, _, err := checkPlan(ctx, s, "volume_extend", in.PlanToken, s.planVolumeExtend)
	if err != nil {
		return Volume{}, err
	}
	v, err := s.c.ExtendVolume(ctx, p.ID, p.SizeBytes)
	if err != nil {
		return Volume{}, err
	}
	return volumeOut(v), nil
}

// ---- volume fork ----

// VolumeForkIn asks for a plan of forking a volume.
type VolumeForkIn struct {
	ID     string `json:"id" jsonschema:"the volume to copy"`
	NewID  string `json:"new_id" jsonschema:"the copy's id"`
	Worker string `json:"worker,omitempty" jsonschema:"the copy's worker (default: the source's worker); another worker clones and hydrates it like a migration"`
}

type volumeForkParams struct {
	ID     string `json:"id"`
	NewID  string `json:"new_id"`
	Worker string `json:"worker"`
}

// VolumeForkDetails is what a volume fork plan rests on.
type VolumeForkDetails struct {
	Source          string `json:"source"`
	Fork            string `json:"fork"`
	Worker          string `json:"worker"`
	SizeBytes       int64  `json:"size_bytes"`
	AttachedMachine string `json:"attached_machine,omitempty" jsonschema:"the machine that keeps running; its filesystem is frozen for the instant of the copy"`
}

func (s *Server) volumeForkPlan(ctx context.Context, in VolumeForkIn) (Plan[VolumeForkDetails], error) {
	return makePlan(ctx, s, "volume_fork", volumeForkParams(in), s.planVolumeFork)
}

// planVolumeFork refuses what the servers would refuse, in their words.
func (s *Server) planVolumeFork(ctx context.Context, p volumeForkParams) ([]string, VolumeForkDetails, error) {
	var d VolumeForkDetails
	if !validID(p.NewID) {
		return nil, d, fmt.Errorf("volume id %q is not valid: 1 to 128 characters, no spaces, slashes, ?, # or %%", p.NewID)
	}
	v, err := s.c.GetVolume(ctx, p.ID)
	if err != nil {
		return nil, d, err
	}
	worker := p.Worker
	if worker == "" {
		worker = v.Worker
	}
	if o, err := s.c.GetVolume(ctx, p.NewID); err == nil {
		return nil, d, fmt.Errorf("volume %s already exists on worker %s", o.ID, o.Worker)
	} else if !notFound(err) {
		return nil, d, err
	}
	switch {
	case v.State != fsm.VolCreated:
		return nil, d, fmt.Errorf("volume %s is %s: only a created volume can be forked", v.ID, v.State)
	case v.Extending():
		return nil, d, fmt.Errorf("volume %s is being extended to %d bytes: fork it once its worker reported the new size", v.ID, v.WantSize)
	}
	if id, err := s.lockHolder(ctx, "volume/"+v.ID); err != nil {
		return nil, d, err
	} else if id != "" {
		return nil, d, fmt.Errorf("volume %s is in migration %s: forking is refused, not queued; fork it once the migration ended (or abort it)", v.ID, id)
	}
	if worker != v.Worker {
		w, err := s.c.GetWorker(ctx, worker)
		if err != nil {
			return nil, d, err
		}
		switch {
		case w.Cordoned:
			return nil, d, fmt.Errorf("worker %s is cordoned (%s): it takes no new volumes; uncordon it or fork elsewhere", w.Name, w.CordonReason)
		case !w.Alive(time.Now()):
			return nil, d, fmt.Errorf("worker %s has no valid lease (last until %s): is its agent running?", w.Name, w.LeaseExpiry.UTC().Format(time.RFC3339))
		}
	}
	d = VolumeForkDetails{Source: v.ID, Fork: p.NewID, Worker: worker, SizeBytes: v.Size, AttachedMachine: v.AttachedMachine}
	changes := []string{
		fmt.Sprintf("register volume %s on %s as a fork of %s (%s), state creating", p.NewID, worker, v.ID, humanBytes(v.Size)),
		fmt.Sprintf("store a new random key for %s on the servers, sealed to %s's key (never shown); the copy gets its own LUKS2 master key", p.NewID, worker),
		fmt.Sprintf("the agent of %s freezes %s's filesystem for the instant its encrypted file is copied aside, then re-encrypts the copy into %s", v.Worker, v.ID, p.NewID),
	}
	if worker != v.Worker {
		changes = append(changes,
			fmt.Sprintf("%s serves that copy over iSCSI to %s alone; %s clones it, mounted at once, hydrates it in the background and marks %s created; then %s deletes its copy", v.Worker, worker, worker, p.NewID, v.Worker),
			fmt.Sprintf("until the copy is made, %s cannot be extended or migrated", v.ID))
	} else {
		changes = append(changes, fmt.Sprintf("it marks %s created; until then, %s cannot be extended or migrated", p.NewID, v.ID))
	}
	if v.AttachedMachine != "" {
		changes = append(changes, fmt.Sprintf("machine %s keeps running; its writes pause for the freeze only", v.AttachedMachine))
	}
	return changes, d, nil
}

func (s *Server) volumeForkApply(ctx context.Context, in ApplyIn) (Volume, error) {
	p, _, err := checkPlan(ctx, s, "volume_fork", in.PlanToken, s.planVolumeFork)
	if err != nil {
		return Volume{}, err
	}
	worker := p.Worker
	if worker == "" {
		src, err := s.c.GetVolume(ctx, p.ID)
		if err != nil {
			return Volume{}, err
		}
		worker = src.Worker
	}
	v, err := s.c.ForkVolume(ctx, p.ID, p.NewID, worker)
	if err != nil {
		return Volume{}, err
	}
	// The fork's worker makes its passphrase and seals it; no key passes here.
	if nv, err := s.c.GetVolume(ctx, v.ID); err == nil {
		v = nv
	}
	return volumeOut(v), nil
}
