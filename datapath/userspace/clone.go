package userspace

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/dmclone"
)

// CloneOptions is a foreground clone of a local source (`ferry clone
// create`): the same serve process as a volume's, with the engine exported
// raw (no LUKS2 view) and the control socket at Socket.
type CloneOptions struct {
	Source, Dest, Meta string
	MountDir, FileName string
	Socket             string // default Meta + ".sock"
	RegionSize         int64
	// KnownZeroHoles: regions in the source file's holes hydrate without a fetch.
	KnownZeroHoles bool
	Loop           bool // attach the file to a loop device (direct I/O)
	Hydrate        bool // background hydration on at once
	Dissolve       bool // serve the destination alone once hydrated
}

// CloneSocket is where the clone with metadata meta answers.
func CloneSocket(meta string) string { return meta + ".sock" }

// Config is the serve configuration of o; it reads the source's holes.
func (o CloneOptions) Config() (Config, error) {
	if o.Source == "" || o.Dest == "" || o.Meta == "" || o.MountDir == "" {
		return Config{}, errors.New("a clone needs a source, a destination, a metadata file and a mount dir")
	}
	if err := dmclone.ValidateRegionSize(o.RegionSize); err != nil {
		return Config{}, err
	}
	sock := o.Socket
	if sock == "" {
		sock = CloneSocket(o.Meta)
	}
	var kz []blockdev.Range
	if o.KnownZeroHoles {
		if st, err := os.Stat(o.Source); err == nil && st.Mode().IsRegular() {
			f, err := os.Open(o.Source)
			if err == nil {
				kz, err = blockdev.Holes(f)
				f.Close()
			}
			if err != nil {
				return Config{}, fmt.Errorf("find holes in %s (turn known-zero off to skip): %w", o.Source, err)
			}
		}
	}
	return Config{VolumeID: filepath.Base(o.Dest), DataPath: o.Dest, MountDir: o.MountDir, FileName: o.FileName,
		Socket: sock, Raw: true, Loop: o.Loop,
		Clone: &Clone{MetaPath: o.Meta, SourcePath: o.Source, RegionSize: o.RegionSize, KnownZero: kz,
			Hydrate: o.Hydrate, AutoDissolve: o.Dissolve}}, nil
}

// ServeClone runs the clone of o in this process until ctx ends or a
// client stops it; ready is called once its file is served.
func ServeClone(ctx context.Context, log zerolog.Logger, o CloneOptions, ready func(Ready)) error {
	cfg, err := o.Config()
	if err != nil {
		return err
	}
	return Serve(ctx, log, cfg, nil, ready)
}
