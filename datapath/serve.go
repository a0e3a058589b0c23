package datapath

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/fuseexport"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/luks"
)

// Serve builds the stack of cfg, exports it over FUSE and answers the
// control socket until shutdown or ctx ends. It is the body of
// `ferry volume serve`.
func Serve(ctx context.Context, log zerolog.Logger, cfg Config, passphrase []byte) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	s := &server{log: log, cfg: cfg}
	if err := s.build(ctx, passphrase); err != nil {
		s.close()
		return err
	}
	defer s.close()
	return s.serve(ctx)
}

type server struct {
	log  zerolog.Logger
	cfg  Config
	mu   sync.Mutex
	dest *blockdev.File
	lun  blockdev.Device
	eng  *dmclone.Engine
	sw   *switchDev // between the clone engine and the view; swapped to dest on dissolve
	view blockdev.Device
	exp  *fuseexport.Export

	hydrating, dissolved bool
}

func (s *server) build(ctx context.Context, passphrase []byte) error {
	var err error
	size := s.cfg.Layout.DeviceSize()
	if s.cfg.Clone == nil {
		s.dest, err = blockdev.OpenFile(s.cfg.DataPath, false)
	} else {
		s.dest, err = blockdev.CreateSparse(s.cfg.DataPath, size)
	}
	if err != nil {
		return err
	}
	lower := blockdev.Device(s.dest)
	if c := s.cfg.Clone; c != nil {
		// Assigned only on success: a nil *LUN in the interface field would
		// pass close's nil check and panic there (the source's link down at
		// exported crashed the datapath this way).
		lun, err := iscsi.Dial(ctx, s.log, iscsi.InitiatorConfig{Portal: c.Portal, IQN: c.IQN, Timeout: 10 * time.Second})
		if err != nil {
			return fmt.Errorf("connect to the source's export %s %s: %w", c.Portal, c.IQN, err)
		}
		s.lun = lun
		if s.lun.Size() != size {
			return fmt.Errorf("source export is %d bytes but the carried layout says %d: refusing to clone", s.lun.Size(), size)
		}
		tun := dmclone.DefaultTunables(regionSize(c.RegionSize))
		tun.RateLimitBytesPerSec = c.RateLimit
		s.eng, err = dmclone.Open(s.log, dmclone.Config{Source: s.lun, Dest: s.dest, MetaPath: c.MetaPath,
			RegionSize: regionSize(c.RegionSize), KnownZero: c.KnownZero, Tunables: tun})
		if err != nil {
			return fmt.Errorf("open clone engine: %w", err)
		}
		if c.Hydrate {
			s.eng.EnableHydration()
			s.hydrating = true
		}
		s.sw = newSwitch(s.eng)
		lower = s.sw
	}
	key, err := luks.Unlock(lower, lower.Size(), passphrase)
	if err != nil {
		return fmt.Errorf("unlock volume %s: %w", s.cfg.VolumeID, err)
	}
	s.view, err = luks.OpenView(lower, s.cfg.Layout, key)
	key.Wipe()
	if err != nil {
		return fmt.Errorf("open plaintext view of %s: %w", s.cfg.VolumeID, err)
	}
	if err := os.MkdirAll(s.cfg.MountDir, 0o700); err != nil {
		return fmt.Errorf("fuse mount dir: %w", err)
	}
	s.exp, err = fuseexport.Mount(s.log, s.cfg.MountDir, DeviceFile, s.view)
	if err != nil {
		return fmt.Errorf("export %s over FUSE: %w", s.cfg.VolumeID, err)
	}
	return nil
}

func (s *server) close() {
	if s.exp != nil {
		if err := s.exp.Close(); err != nil {
			s.log.Warn().Err(err).Msg("unmount FUSE export")
		}
	}
	if s.view != nil {
		s.view.Flush()
	}
	if s.eng != nil {
		s.eng.Close()
	}
	if s.lun != nil {
		s.lun.Close()
	}
	if s.dest != nil {
		s.dest.Flush()
		s.dest.Close()
	}
}

func (s *server) status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{VolumeID: s.cfg.VolumeID, Pid: os.Getpid(), Cloning: s.eng != nil && !s.dissolved,
		Hydrating: s.hydrating, Dissolved: s.dissolved}
	if s.eng != nil {
		p := s.eng.Progress()
		st.Progress = fromEngine(p)
		st.Complete = p.Complete
	} else {
		st.Complete = true
	}
	return st
}

func (s *server) serve(ctx context.Context) error {
	_ = os.Remove(s.cfg.Socket)
	ln, err := net.Listen("unix", s.cfg.Socket)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	os.Chmod(s.cfg.Socket, 0o600)
	stop := make(chan struct{})
	var once sync.Once
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, v any, err error) {
		if err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		json.NewEncoder(w).Encode(v)
	}
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) { reply(w, s.status(), nil) })
	mux.HandleFunc("POST /v1/hydration/enable", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.eng == nil || s.dissolved {
			reply(w, struct{}{}, nil)
			return
		}
		s.eng.EnableHydration()
		s.hydrating = true
		reply(w, struct{}{}, nil)
	})
	mux.HandleFunc("POST /v1/dissolve", func(w http.ResponseWriter, r *http.Request) { reply(w, struct{}{}, s.dissolve()) })
	mux.HandleFunc("POST /v1/shutdown", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, nil)
		once.Do(func() { close(stop) })
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	s.log.Info().Str("volume", s.cfg.VolumeID).Str("device", s.cfg.DevicePath()).Msg("datapath serving")
	select {
	case <-ctx.Done():
	case <-stop:
	}
	srv.Close()
	os.Remove(s.cfg.Socket)
	return nil
}

// dissolve swaps the clone out from under the view once every region is
// hydrated: the view then reads the destination file directly, and the
// iSCSI session is closed. The kernel above never notices.
func (s *server) dissolve() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.eng == nil || s.dissolved {
		return nil
	}
	p := s.eng.Progress()
	if !p.Complete {
		return fmt.Errorf("volume %s is not fully hydrated (%d/%d regions): cannot dissolve yet", s.cfg.VolumeID, p.HydratedRegions, p.TotalRegions)
	}
	// Swap waits for in-flight I/O; from then on the view reads the
	// destination directly, and the engine can finish and let go.
	s.sw.Swap(s.dest)
	if _, err := s.eng.Dissolve(); err != nil {
		s.sw.Swap(s.eng)
		return fmt.Errorf("dissolve clone of %s: %w", s.cfg.VolumeID, err)
	}
	s.lun = nil // the engine closed it
	s.dissolved = true
	return nil
}

func regionSize(rs int64) int64 {
	if rs == 0 {
		return 4096
	}
	return rs
}

func fromEngine(p dmclone.Progress) *Progress {
	return &Progress{
		RegionSize: p.RegionSize, TotalRegions: p.TotalRegions, HydratedRegions: p.HydratedRegions,
		TotalBytes: p.TotalRegions * p.RegionSize, HydratedBytes: p.HydratedRegions * p.RegionSize,
		FetchedBytes: p.FetchedBytes, SkippedBytes: p.SkippedDiscardBytes + p.SkippedKnownZeroBytes,
		SkippedDiscardBytes: p.SkippedDiscardBytes, SkippedKnownZeroBytes: p.SkippedKnownZeroBytes,
		RateBPS: int64(p.RateBPS), ETASeconds: int64(p.ETA.Seconds()), Stalled: p.Stalled, StalledReason: p.StalledReason,
	}
}
