package mcp

import (
	"context"
	"fmt"

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
