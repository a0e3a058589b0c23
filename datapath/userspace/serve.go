package userspace

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/fuseexport"
	"github.com/ferry-dev/ferry/datapath/internal/hostfs"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/datapath/nbdexport"
	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/internal/childctl"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/luks"
)

// Ready is what Serve reports once its file is served.
type Ready struct {
	File   string `json:"file"`
	Loop   string `json:"loop,omitempty"`
	Socket string `json:"socket"`
}

// Serve builds the stack of cfg, exports it over FUSE and answers the
// control socket until shutdown or ctx ends; ready (if not nil) is called
// once the file is served. It is the body of `ferry volume serve` and of
// `ferry clone create`.
func Serve(ctx context.Context, log zerolog.Logger, cfg Config, passphrase []byte, ready func(Ready)) error {
	return serveKeyed(ctx, log, cfg, func() ([]byte, error) { return bytes.Clone(passphrase), nil }, ready)
}

// serveKeyed is Serve with the passphrase asked of pass only when the view
// opens; its caller clears what it returns.
func serveKeyed(ctx context.Context, log zerolog.Logger, cfg Config, pass func() ([]byte, error), ready func(Ready)) error {
	return serveEarly(ctx, log, cfg, pass, ready, nil)
}

// serveEarly is serveKeyed adopting early, a login begun before cfg was
// final, when it reaches cfg's export (closed otherwise).
func serveEarly(ctx context.Context, log zerolog.Logger, cfg Config, pass func() ([]byte, error), ready func(Ready), early *earlyLogin) error {
	if err := cfg.Validate(); err != nil {
		early.close()
		return err
	}
	s := &server{log: log, cfg: cfg, deny: &iscsi.DenyList{}, early: early}
	if early != nil {
		s.deny = early.deny
	}
	err := s.build(ctx, pass)
	s.early.close() // not adopted: its session is not this clone's
	if err != nil {
		s.close()
		return err
	}
	defer s.close()
	return s.serve(ctx, ready)
}

type server struct {
	log  zerolog.Logger
	cfg  Config
	mu   sync.Mutex
	dest *blockdev.File
	// direct is dest as the view reads and writes it (O_DIRECT); nil where
	// the filesystem refuses O_DIRECT, then the view uses dest itself.
	direct *blockdev.Direct
	lun    blockdev.Device // the clone's source: an iSCSI LUN or a local file
	eng    *dmclone.Engine
	sw     *switchDev // between the clone engine and the view; swapped to dest on dissolve
	cow    *cowDev    // right under the view: point-in-time copies for forks
	view   blockdev.Device
	exp    *fuseexport.Export
	loop   string // the loop device this process attached (Config.Loop)
	pre    *prefetcher
	// mounted starts the read-ahead that waits for the filesystem's mount
	// (POST /v1/mounted); nil when there is none.
	mounted func()
	// nbd and device: the NBD export and the dm-crypt device over it
	// (Config.BlockExport nbd).
	nbd    *nbdexport.Export
	device string
	// deny is the revoked serials the initiator refuses (Clone.Denied,
	// then POST /v1/denied).
	deny *iscsi.DenyList
	// early is a login begun before the configuration was final
	// (earlylogin.go); build adopts it when it reaches the same export.
	early *earlyLogin

	hydrating, dissolved, stopped bool
}

func (s *server) build(ctx context.Context, pass func() ([]byte, error)) error {
	var err error
	t0 := time.Now()
	var tDial, tEngine, tKey, tView, tFuse time.Duration
	var adopted atomic.Bool     // the session logged in before the configuration was final
	var image *luks.HeaderImage // the header read at the early login; set before login.set
	usedImage := false
	defer func() {
		image.Wipe()
		if err == nil {
			s.log.Info().Bool("early_login", adopted.Load()).Bool("header_image", usedImage).Dur("dial", tDial).Dur("engine", tEngine).Dur("key", tKey).Dur("view", tView).Dur("fuse", tFuse).Dur("total", time.Since(t0)).Msg("datapath built")
		}
	}()
	size := s.cfg.Layout.DeviceSize()
	c := s.cfg.Clone
	var early *earlyMount
	if c != nil && !s.cfg.Raw && !s.cfg.nbd() {
		// A clone's FUSE file is mounted while it connects to its source
		// and opens (a machine's pause waits on both); the view is swapped
		// in once open. On failure it is unmounted like the rest.
		early = s.mountEarly(s.cfg.Layout.PayloadSize)
		defer func() {
			if early != nil {
				if exp, _ := early.wait(); exp != nil && s.exp == nil {
					s.exp = exp
				}
			}
		}()
	}
	// The source's first session logs in while the destination and the
	// engine open (its metadata, known-zero discards and first commit: tens
	// of milliseconds on a large volume, inside a migration's pause): the
	// engine reads nothing of its source before the view opens, which
	// waits for the login.
	var login *pendingSource
	// The engine's memory, made while the prestarted process waited for
	// this configuration (any early login's: it is only memory).
	prealloc := s.early.preallocated()
	if c != nil {
		if c.SourcePath != "" {
			// Assigned only on success: a nil pointer in the interface
			// field would pass close's nil check and panic there.
			src, err := blockdev.OpenFile(c.SourcePath, true)
			if err != nil {
				return err
			}
			s.lun = src
		} else {
			var ic iscsi.InitiatorConfig
			if ic, err = initiatorConfig(c, s.deny, s.cfg.VolumeID); err != nil {
				return err
			}
			if s.cfg.Raw {
				// The size comes from the source itself: wait for it.
				lun, err := iscsi.Dial(ctx, s.log, ic)
				if err != nil {
					return fmt.Errorf("connect to the source's export %s %s: %w", c.Portal, c.IQN, err)
				}
				s.lun = lun
			} else {
				login = newPendingSource(size)
				early := s.early.adopt(c)
				if early != nil {
					s.early = nil // this clone's now
				}
				go func() {
					var lun *iscsi.LUN
					var err error
					if early != nil {
						// Logged in before the source stopped: the session
						// is up, or its error says to dial again.
						if lun, err = early.wait(ctx); err != nil {
							s.log.Info().Err(err).Msg("the early login to the source failed; logging in again")
						}
						adopted.Store(lun != nil)
						if lun != nil {
							image = early.image
						}
					}
					if lun == nil {
						lun, err = iscsi.Dial(ctx, s.log, ic)
					}
					if err != nil {
						err = fmt.Errorf("connect to the source's export %s %s: %w", c.Portal, c.IQN, err)
					}
					login.set(lun, err, time.Since(t0))
				}()
			}
		}
		if login == nil {
			tDial = time.Since(t0)
			if s.cfg.Raw {
				size = s.lun.Size()
			} else if s.lun.Size() != size {
				return fmt.Errorf("source export is %d bytes but the carried layout says %d: refusing to clone", s.lun.Size(), size)
			}
		}
	}
	// Whatever fails below, the login is waited for: its session is closed
	// with the rest (server.close), never left behind.
	loginDone := func() error {
		if login == nil {
			return nil
		}
		lun, took, err := login.wait()
		tDial = took
		if err != nil {
			return err
		}
		if s.lun == nil {
			s.lun = lun
		}
		if lun.Size() != size {
			return fmt.Errorf("source export is %d bytes but the carried layout says %d: refusing to clone", lun.Size(), size)
		}
		return nil
	}
	defer func() {
		if login != nil {
			_ = loginDone()
		}
	}()
	switch st, serr := os.Stat(s.cfg.DataPath); {
	case c == nil:
		s.dest, err = blockdev.OpenFile(s.cfg.DataPath, false)
	case serr == nil && !st.Mode().IsRegular():
		s.dest, err = blockdev.OpenFile(s.cfg.DataPath, false) // a block device as the destination
	default:
		s.dest, err = blockdev.CreateSparse(s.cfg.DataPath, size)
	}
	if err != nil {
		return err
	}
	// The agent made the file sparse (volops.Allocate): nothing to discard
	// on it for the source's holes, unless an earlier start wrote into it.
	destZeroed := c != nil && s.dest.AllZero()
	lower := s.viewDest()
	if c != nil {
		var src blockdev.Device = s.lun
		if login != nil {
			src = login
		}
		tun := c.tunables()
		// The engine writes what it hydrates through the view's O_DIRECT
		// handle, as dm-clone writes its destination device: a volume's
		// copy does not pass the host's page cache (where it would push the
		// host's other data out, and cost a copy and a page per block).
		s.eng, err = dmclone.Open(s.log, dmclone.Config{Source: src, Dest: lower, MetaPath: c.MetaPath,
			RegionSize: regionSize(c.RegionSize), KnownZero: c.KnownZero, Tunables: tun,
			Prealloc: prealloc, DestZeroed: destZeroed})
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
	tEngine = time.Since(t0)
	if err = loginDone(); err != nil {
		return err
	}
	login = nil
	// Every write of the machine passes the copy-on-write layer, which
	// keeps a point-in-time copy's instant while a fork copies it.
	s.cow = newCow(s.log, lower)
	lower = s.cow
	s.view = lower
	if s.cfg.nbd() {
		// No read-ahead here: the plaintext it parses is the kernel's.
		passphrase, err := pass()
		if err != nil {
			return fmt.Errorf("the key of %s: %w", s.cfg.VolumeID, err)
		}
		defer clear(passphrase)
		return s.buildNBD(ctx, passphrase)
	}
	if !s.cfg.Raw {
		// The header may be served by the source: compared with the
		// carried layout before any KDF runs.
		passphrase, err := pass()
		if err != nil {
			return fmt.Errorf("the key of %s: %w", s.cfg.VolumeID, err)
		}
		tKey = time.Since(t0)
		var view blockdev.Device
		if image != nil {
			if view, err = image.OpenCarriedView(lower, s.cfg.Layout, passphrase); err != nil {
				s.log.Info().Err(err).Msg("the header kept from the early login did not open; reading it again through the clone")
			}
			usedImage = err == nil
		}
		if !usedImage {
			view, err = luks.OpenCarriedView(lower, s.cfg.Layout, passphrase)
		}
		clear(passphrase)
		if err != nil {
			return fmt.Errorf("open plaintext view of %s: %w", s.cfg.VolumeID, err)
		}
		s.view = view
	}
	tView = time.Since(t0)
	if c != nil && !s.cfg.Raw && !s.eng.Progress().Complete {
		// Read while FUSE, the loop device and the mount start.
		s.pre = newPrefetcher()
		metadata, files := ext4Stages(s.view, s.cfg.Layout.DataOffset)
		s.pre.run(lower, s.prefetched, metadata)
		s.mounted = sync.OnceFunc(func() { s.pre.run(lower, s.prefetched, files) })
	}
	if early != nil {
		exp, merr := early.wait()
		early = nil
		if merr != nil {
			return fmt.Errorf("export %s over FUSE: %w", s.cfg.VolumeID, merr)
		}
		s.exp = exp
		if s.view.Size() != s.cfg.Layout.PayloadSize {
			return fmt.Errorf("the plaintext view of %s is %d bytes, the carried layout says %d", s.cfg.VolumeID, s.view.Size(), s.cfg.Layout.PayloadSize)
		}
		if _, err := exp.Swap(s.view); err != nil {
			return fmt.Errorf("export %s over FUSE: %w", s.cfg.VolumeID, err)
		}
	} else {
		if err := os.MkdirAll(s.cfg.MountDir, 0o700); err != nil {
			return fmt.Errorf("fuse mount dir: %w", err)
		}
		s.exp, err = fuseexport.Mount(s.log, s.cfg.MountDir, s.cfg.fileName(), s.view)
		if err != nil {
			return fmt.Errorf("export %s over FUSE: %w", s.cfg.VolumeID, err)
		}
	}
	tFuse = time.Since(t0)
	if s.cfg.Loop {
		if s.loop, err = loopdev.Attach(s.exp.Path(), true); err != nil {
			return fmt.Errorf("attach %s to a loop device: %w", s.exp.Path(), err)
		}
	}
	return nil
}

// earlyMount is a FUSE file mounted before its device is ready.
type earlyMount struct {
	done chan struct{}
	exp  *fuseexport.Export
	err  error
}

// mountEarly mounts the FUSE file in the background over a device of size
// bytes that fails every request until the real one is swapped in; nothing
// reads the file before this process answers on its socket.
func (s *server) mountEarly(size int64) *earlyMount {
	m := &earlyMount{done: make(chan struct{})}
	go func() {
		defer close(m.done)
		if err := os.MkdirAll(s.cfg.MountDir, 0o700); err != nil {
			m.err = fmt.Errorf("fuse mount dir: %w", err)
			return
		}
		m.exp, m.err = fuseexport.Mount(s.log, s.cfg.MountDir, s.cfg.fileName(), notReady(size))
	}()
	return m
}

func (m *earlyMount) wait() (*fuseexport.Export, error) {
	<-m.done
	return m.exp, m.err
}

// notReady is a device of a known size that serves nothing yet.
type notReady int64

var errNotReady = errors.New("the volume's datapath is still starting")

func (n notReady) ReadAt([]byte, int64) (int, error)  { return 0, errNotReady }
func (n notReady) WriteAt([]byte, int64) (int, error) { return 0, errNotReady }
func (n notReady) Size() int64                        { return int64(n) }
func (n notReady) Discard(int64, int64) error         { return errNotReady }
func (n notReady) Flush() error                       { return errNotReady }
func (n notReady) Close() error                       { return nil }

// buildNBD serves the ciphertext (clone, copy-on-write layer) to the
// kernel as /dev/nbdN and opens it with kernel dm-crypt: the plaintext
// never passes this process, and no request crosses FUSE or a loop
// device. cryptsetup reads the header only after it was compared with the
// carried layout (luks.OpenKernel).
func (s *server) buildNBD(ctx context.Context, passphrase []byte) error {
	// The mount dir stays the volume's mark on this host (CleanupAll
	// lists volumes by it), though nothing is mounted there.
	if err := os.MkdirAll(s.cfg.MountDir, 0o700); err != nil {
		return fmt.Errorf("volume dir: %w", err)
	}
	var err error
	if s.nbd, err = nbdexport.Attach(ctx, s.log, s.view, nbdexport.Options{}); err != nil {
		return fmt.Errorf("export %s over NBD: %w", s.cfg.VolumeID, err)
	}
	return hostfs.WithKeyFile(filepath.Dir(s.cfg.Socket), passphrase, func(kf string) error {
		dev, err := luks.OpenKernel(ctx, s.nbd.Path(), NBDCryptName(s.cfg.VolumeID), s.cfg.Layout, kf)
		if err != nil {
			return fmt.Errorf("open %s with dm-crypt: %w", s.nbd.Path(), err)
		}
		s.device = dev
		return nil
	})
}

// closeNBD closes the dm-crypt mapping (refused while mounted), then
// detaches the NBD device.
func (s *server) closeNBD() error {
	if s.device != "" {
		if err := luks.CloseKernel(context.Background(), NBDCryptName(s.cfg.VolumeID)); err != nil {
			return fmt.Errorf("close %s (unmount its filesystem first): %w", s.device, err)
		}
		s.device = ""
	}
	if s.nbd != nil {
		err := s.nbd.Close()
		s.nbd = nil
		if err != nil {
			return err
		}
	}
	return nil
}

// prefetched logs the end of a read-ahead.
func (s *server) prefetched(what string, n int64, took time.Duration, err error) {
	ev := s.log.Info()
	if err != nil {
		// The machine's own reads fetch what is missing.
		ev = s.log.Warn().Err(err)
	}
	ev.Str("what", what).Int64("bytes", n).Dur("took", took).Msg("read ahead through the clone")
}

func (s *server) close() {
	if s.pre != nil {
		s.pre.stop()
	}
	if err := s.closeNBD(); err != nil {
		s.log.Warn().Err(err).Msg("release the NBD export")
	}
	if s.loop != "" {
		if err := loopdev.Detach(s.loop); err != nil {
			s.log.Warn().Err(err).Str("loop", s.loop).Msg("detach loop device")
		}
	}
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
	if s.lun != nil && !s.dissolved {
		s.lun.Close()
	}
	if s.direct != nil {
		s.direct.Close()
	}
	if s.dest != nil {
		s.dest.Flush()
		s.dest.Close()
	}
}

// AllocateChunk is how much of a sparse volume file the first direct write
// into it allocates at once. ext4 runs direct writes that allocate one at a
// time, and direct reads wait behind them, so a machine writing into space
// it never wrote got about half the random-write rate at three times the
// latency (docs/profiles.md, with the sweep that chose 256 KiB). Larger
// chunks also keep what a machine writes side by side together on the
// disk: its writes in flight land in any order, each chunk where free
// blocks happen to be, and ext4 runs a direct write that spans extents
// alone. fio laying out a 256 MiB file left the volume file in about 360
// extents with 256 KiB chunks, 180 with 1 MiB and 60 with 4 MiB, and its
// 1 MiB writes then ran at 0.63–0.70, 0.76–0.94 and 0.96–1.08 of the
// same transport over a file laid out in order (docs/profiles.md). The
// chunk's unwritten blocks read as zeros and are holes to SEEK_DATA, so a
// migration does not fetch them; a thin volume file grows by up to a
// chunk per scattered write, never past the volume's size (which placement
// already reserves on a migration's target).
const AllocateChunk = 4 << 20

// viewDest is the destination file as the view should reach it: with
// O_DIRECT, like a disk the host does not cache (the machine caches in its
// own page cache; a second copy in the host's costs a page allocation and a
// copy per request and memory the host does not have to spare). Where the
// filesystem refuses O_DIRECT (tmpfs) the buffered file serves.
func (s *server) viewDest() blockdev.Device {
	if s.direct == nil {
		d, err := blockdev.OpenDirect(s.dest, false)
		if err != nil {
			s.log.Warn().Err(err).Msg("the volume file cannot be opened with O_DIRECT: serving it through the host page cache")
			return s.dest
		}
		if st, err := os.Stat(s.cfg.DataPath); err == nil && st.Mode().IsRegular() {
			if err := d.AllocateAhead(AllocateChunk); err != nil {
				s.log.Warn().Err(err).Msg("writes into the volume's unwritten space will allocate one at a time")
			}
		}
		s.direct = d
	}
	return s.direct
}

// stop releases what the process owns that another user can hold: its loop
// device and the FUSE mount. It refuses, changing nothing it cannot undo,
// while something else uses them (`ferry clone remove` on a mounted file).
func (s *server) stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cfg.nbd() && !s.stopped {
		if err := s.closeNBD(); err != nil {
			return err
		}
	}
	if s.stopped || !s.cfg.Loop {
		s.stopped = true
		return nil
	}
	if s.loop != "" {
		if err := loopdev.Detach(s.loop); err != nil {
			return fmt.Errorf("detach %s (unmount its filesystem first): %w", s.loop, err)
		}
		s.loop = ""
	}
	if err := s.exp.Close(); err != nil {
		return err
	}
	s.exp = nil
	s.stopped = true
	return nil
}

// ProcessStatus is what the control socket reports: the backend's status,
// where the volume is served, and the clone engine's own record.
type ProcessStatus struct {
	datapath.Status
	File   string            `json:"file"`
	Loop   string            `json:"loop,omitempty"`
	Device string            `json:"device,omitempty"` // the dm-crypt device over NBD
	Engine *dmclone.Progress `json:"engine,omitempty"`
	// Snapshot is the running or last point-in-time copy (forks).
	Snapshot *SnapshotStatus `json:"snapshot,omitempty"`
}

func (s *server) status() ProcessStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := ProcessStatus{Status: datapath.Status{VolumeID: s.cfg.VolumeID, Pid: os.Getpid(), Cloning: s.eng != nil && !s.dissolved,
		Hydrating: s.hydrating, Dissolved: s.dissolved}, File: s.cfg.DevicePath(), Loop: s.loop, Device: s.device}
	if s.cow != nil {
		st.Snapshot = s.cow.SnapshotStatus()
	}
	if s.eng != nil {
		p := s.eng.Progress()
		st.Progress = fromEngine(p)
		st.Complete = p.Complete
		st.Engine = &p
	} else {
		st.Complete = true
	}
	return st
}

func (s *server) serve(ctx context.Context, ready func(Ready)) error {
	ln, err := childctl.Listen(s.cfg.Socket)
	if err != nil {
		return err
	}
	stop := make(chan struct{})
	var once sync.Once
	mux := http.NewServeMux()
	reply := childctl.Reply
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) { reply(w, s.status(), nil) })
	mux.HandleFunc("POST /v1/hydration/enable", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.eng == nil || s.dissolved {
			reply(w, struct{}{}, nil)
			return
		}
		fg := s.eng.Foreground()
		s.log.Info().Int64("fetches", fg.Count).Int64("bytes", fg.Bytes).Dur("wait", fg.Wait).Msg("on-demand fetches before hydration")
		err := s.eng.EnableHydration()
		s.hydrating = s.hydrating || err == nil
		reply(w, struct{}{}, err)
	})
	mux.HandleFunc("POST /v1/hydration/disable", func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.eng == nil || s.dissolved {
			reply(w, struct{}{}, nil)
			return
		}
		err := s.eng.DisableHydration()
		s.hydrating = s.hydrating && err != nil
		reply(w, struct{}{}, err)
	})
	mux.HandleFunc("POST /v1/source", func(w http.ResponseWriter, r *http.Request) {
		var to SourceMove
		if err := childctl.Decode(r, &to); err != nil {
			reply(w, nil, &childctl.Error{Status: http.StatusBadRequest, Message: fmt.Sprintf("move the source needs a portal and an IQN: %v", err)})
			return
		}
		s.mu.Lock()
		lun, ok := s.lun.(*iscsi.LUN)
		dissolved := s.dissolved
		s.mu.Unlock()
		if !ok || dissolved {
			reply(w, struct{}{}, errors.New("this clone does not read its source over iSCSI (or is dissolved): nothing to move"))
			return
		}
		reply(w, struct{}{}, lun.Retarget(r.Context(), to.Portal, to.IQN))
	})
	mux.HandleFunc("POST /v1/denied", func(w http.ResponseWriter, r *http.Request) {
		var req DenyUpdate
		// A list of up to 100000 serials does not fit childctl.Decode's 1 MiB.
		dec := json.NewDecoder(io.LimitReader(r.Body, 8<<20))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			reply(w, nil, &childctl.Error{Status: http.StatusBadRequest, Message: fmt.Sprintf("deny list needs {\"serials\": [...]}: %v", err)})
			return
		}
		reply(w, struct{}{}, s.setDenied(req.Serials))
	})
	mux.HandleFunc("POST /v1/tunables", func(w http.ResponseWriter, r *http.Request) {
		var t *dmclone.Tunables
		if err := childctl.Decode(r, &t); err != nil || t == nil {
			reply(w, nil, &childctl.Error{Status: http.StatusBadRequest, Message: fmt.Sprintf("set tunables needs a tunables record: %v", err)})
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.eng == nil || s.dissolved {
			reply(w, struct{}{}, errors.New("no clone engine runs here (never cloned, or dissolved)"))
			return
		}
		reply(w, struct{}{}, s.eng.SetTunables(*t))
	})
	mux.HandleFunc("POST /v1/grow", func(w http.ResponseWriter, r *http.Request) {
		var g GrowRequest
		if err := childctl.Decode(r, &g); err != nil {
			reply(w, nil, &childctl.Error{Status: http.StatusBadRequest, Message: fmt.Sprintf("grow needs {\"payload_size\": bytes}: %v", err)})
			return
		}
		reply(w, struct{}{}, s.grow(g.PayloadSize))
	})
	mux.HandleFunc("POST /v1/snapshot", func(w http.ResponseWriter, r *http.Request) {
		var req SnapshotRequest
		if err := childctl.Decode(r, &req); err != nil || !filepath.IsAbs(req.Path) || filepath.Clean(req.Path) == filepath.Clean(s.cfg.DataPath) {
			reply(w, nil, &childctl.Error{Status: http.StatusBadRequest, Message: fmt.Sprintf("snapshot needs {\"path\": an absolute path other than the volume file}: %v", err)})
			return
		}
		st, err := s.cow.Snapshot(filepath.Clean(req.Path), s.dataRanges)
		reply(w, st, err)
	})
	mux.HandleFunc("POST /v1/mounted", func(w http.ResponseWriter, r *http.Request) {
		if s.mounted != nil {
			s.mounted()
		}
		reply(w, struct{}{}, nil)
	})
	mux.HandleFunc("POST /v1/dissolve", func(w http.ResponseWriter, r *http.Request) { reply(w, struct{}{}, s.dissolve()) })
	mux.HandleFunc("POST /v1/shutdown", func(w http.ResponseWriter, r *http.Request) {
		if err := s.stop(); err != nil {
			reply(w, nil, err)
			return
		}
		reply(w, struct{}{}, nil)
		once.Do(func() { close(stop) })
	})
	srv := childctl.Serve(ln, mux)
	file := s.cfg.DevicePath()
	if s.device != "" {
		file = s.device
	}
	s.log.Info().Str("volume", s.cfg.VolumeID).Str("device", file).Msg("datapath serving")
	if ready != nil {
		ready(Ready{File: file, Loop: s.loop, Socket: s.cfg.Socket})
	}
	if c := s.cfg.Clone; c != nil && c.AutoDissolve {
		go func() {
			select {
			case <-s.eng.Done():
				if err := s.dissolve(); err != nil {
					s.log.Error().Err(err).Msg("dissolve")
				}
			case <-stop:
			case <-ctx.Done():
			}
		}()
	}
	select {
	case <-ctx.Done():
		if err := s.stop(); err != nil {
			// Its loop or file is still in use: keep serving it.
			s.log.Error().Err(err).Msg("stop refused; still serving until a stop request succeeds")
			<-stop
		}
	case <-stop:
	}
	srv.Close()
	os.Remove(s.cfg.Socket)
	return nil
}

// DenyUpdate is the body of POST /v1/denied: the revoked certificate
// serials, the whole list.
type DenyUpdate struct {
	Serials []string `json:"serials"`
}

// setDenied replaces the deny list and cuts the source's live sessions if
// its certificate is now on it: the initiator's reconnects are refused, so
// the clone reads nothing more from it and hydration stalls naming the
// revocation.
func (s *server) setDenied(serials []string) error {
	changed, err := s.deny.Set(serials)
	if err != nil {
		return &childctl.Error{Status: http.StatusBadRequest, Message: err.Error()}
	}
	s.mu.Lock()
	lun, ok := s.lun.(*iscsi.LUN)
	dissolved := s.dissolved
	s.mu.Unlock()
	if changed {
		s.log.Info().Int("serials", len(serials)).Msg("certificate deny list changed")
	}
	if ok && !dissolved {
		if n := lun.CutDenied(); n > 0 {
			s.log.Error().Str("volume", s.cfg.VolumeID).Int("sessions", n).
				Msg("the clone's source certificate was revoked: cut its sessions; the clone reads nothing more from it")
		}
	}
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
	s.sw.Swap(s.viewDest())
	if _, err := s.eng.Dissolve(); err != nil {
		s.sw.Swap(s.eng)
		return fmt.Errorf("dissolve clone of %s: %w", s.cfg.VolumeID, err)
	}
	s.lun = nil // the engine closed it
	s.dissolved = true
	return nil
}

// SnapshotRequest asks a serving process for a point-in-time copy of its
// ciphertext into Path (see cowDev.Snapshot).
type SnapshotRequest struct {
	Path string `json:"path"`
}

// dataRanges lists the allocated ranges of the volume file: the regions a
// point-in-time copy has to copy (holes read as zeros in the copy too).
func (s *server) dataRanges() ([]blockdev.Range, error) {
	f, err := os.Open(s.cfg.DataPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return blockdev.DataRanges(f)
}

// GrowRequest asks a serving process to grow its volume to PayloadSize
// plaintext bytes.
type GrowRequest struct {
	PayloadSize int64 `json:"payload_size"`
}

// grow extends the ciphertext file, then the plaintext view (the LUKS2
// segment is dynamic: it ends where the file ends), then the FUSE file, in
// that order so no layer ever serves past the one below. Repeating it with
// the size it has is a no-op. A clone under the view is sized from the
// source, so growth waits until it dissolved.
func (s *server) grow(payload int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.cfg.Raw:
		return errors.New("a raw export has no LUKS2 segment to grow")
	case s.eng != nil && !s.dissolved:
		return fmt.Errorf("volume %s is still cloning from a migration's source: extend it once hydration completed", s.cfg.VolumeID)
	case s.exp == nil && s.nbd == nil:
		return fmt.Errorf("volume %s is stopping", s.cfg.VolumeID)
	case payload <= 0 || payload%int64(s.cfg.Layout.SectorSize) != 0 || payload > math.MaxInt64-s.cfg.Layout.DataOffset:
		return fmt.Errorf("payload size %d is not a positive multiple of the %d-byte sector", payload, s.cfg.Layout.SectorSize)
	}
	if err := s.dest.Grow(s.cfg.Layout.DataOffset + payload); err != nil {
		return err
	}
	if s.nbd != nil {
		// The kernel's dm-crypt over it grows next (the caller's
		// cryptsetup resize: it needs the passphrase).
		if err := s.nbd.Grow(s.cfg.Layout.DataOffset + payload); err != nil {
			return err
		}
	} else {
		if err := luks.GrowView(s.view, payload); err != nil {
			return err
		}
		if err := s.exp.Grow(payload); err != nil {
			return err
		}
	}
	s.cfg.Layout.PayloadSize = payload
	s.log.Info().Str("volume", s.cfg.VolumeID).Int64("payload_size", payload).Msg("volume grew")
	return nil
}

func regionSize(rs int64) int64 {
	if rs == 0 {
		return 4096
	}
	return rs
}

// tunables are the engine's defaults with the clone's rate limit and idle
// batch choice.
func (c *Clone) tunables() dmclone.Tunables {
	tun := dmclone.DefaultTunables(regionSize(c.RegionSize))
	tun.RateLimitBytesPerSec = c.RateLimit
	if c.NoIdleBatches {
		tun.IdleBatchRegions = 0
	}
	return tun
}

func fromEngine(p dmclone.Progress) *datapath.Progress {
	return &datapath.Progress{
		RegionSize: p.RegionSize, TotalRegions: p.TotalRegions, HydratedRegions: p.HydratedRegions,
		TotalBytes: p.TotalRegions * p.RegionSize, HydratedBytes: p.HydratedRegions * p.RegionSize,
		FetchedBytes: p.FetchedBytes, SkippedBytes: p.SkippedDiscardBytes + p.SkippedKnownZeroBytes,
		SkippedDiscardBytes: p.SkippedDiscardBytes, SkippedKnownZeroBytes: p.SkippedKnownZeroBytes,
		RateBPS: int64(p.RateBPS), ETASeconds: int64(p.ETA.Seconds()), Stalled: p.Stalled, StalledReason: p.StalledReason,
	}
}

// ServeConfigFile is `ferry volume serve --config path`: it reads the
// config the agent wrote (unknown fields refused, so a newer agent's config
// never half-applies) and the passphrase from stdin, then serves.
func ServeConfigFile(ctx context.Context, log zerolog.Logger, path string, stdin io.Reader) error {
	return serveConfigFile(ctx, log, path, stdin, nil)
}

func serveConfigFile(ctx context.Context, log zerolog.Logger, path string, stdin io.Reader, early *earlyLogin) error {
	if n := ServeProcs(); n > 0 {
		runtime.GOMAXPROCS(n)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		early.close()
		return err
	}
	cfg, err := decodeConfig(b)
	if err != nil {
		early.close()
		return fmt.Errorf("datapath config %s: %w", path, err)
	}
	// The passphrase is read when the view opens: the agent may still be
	// fetching it while this process logs in to the source.
	pass := func() ([]byte, error) { return io.ReadAll(io.LimitReader(stdin, 4096)) }
	// Each layer (dmclone, iscsi, fuseexport) sets its own component; this
	// process is named by its own field so keys never repeat.
	return serveEarly(ctx, log.With().Str("process", "datapath").Str("volume", cfg.VolumeID).Logger(), cfg, pass, nil, early)
}

// decodeConfig parses a datapath configuration, refusing unknown fields.
func decodeConfig(b []byte) (Config, error) {
	var cfg Config
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	err := dec.Decode(&cfg)
	return cfg, err
}

// MinServeProcs is the least GOMAXPROCS a datapath process runs with.
//
// Every request the datapath serves blocks a thread in a system call: a
// read of /dev/fuse or an NBD socket, a read or write of the destination
// with O_DIRECT. With as many Ps as cores, the runtime's monitor takes the
// P of each thread blocked for more than 20 µs and hands it to another
// thread, and the thread returning must find a P again: several futex
// wake-ups and context switches per request, and the monitor itself wakes
// every 20 µs while that goes on. With spare Ps it leaves a thread its P
// (profiles in docs/profiles.md: on 2 cores, 4 KiB random reads through
// the FUSE path went from about 20 k to 30–39 k IOPS).
const MinServeProcs = 16

// ServeProcs is the GOMAXPROCS for a datapath process: MinServeProcs or
// the cores, whichever is more; 0 when the environment sets GOMAXPROCS.
func ServeProcs() int {
	if os.Getenv("GOMAXPROCS") != "" {
		return 0
	}
	return max(MinServeProcs, runtime.NumCPU())
}

// ServeChildIfAsked makes a test binary stand in for `ferry volume serve`:
// started as `BIN volume serve --config FILE` (by the backend suite, whose
// Backend.Exe is the test binary) it serves FILE and exits; otherwise it
// returns at once. Call it first in TestMain.
func ServeChildIfAsked() {
	if len(os.Args) <= 4 || os.Args[1] != "volume" || os.Args[2] != "serve" || os.Args[3] != "--config" {
		return
	}
	log := zerolog.New(os.Stderr).With().Timestamp().Logger()
	serve := ServeConfigFile
	if slices.Contains(os.Args[5:], AwaitConfigFlag) {
		serve = func(ctx context.Context, log zerolog.Logger, path string, stdin io.Reader) error {
			var status io.WriteCloser
			if i := slices.Index(os.Args, StatusFDFlag); i > 0 && i+1 < len(os.Args) {
				if fd, err := strconv.Atoi(os.Args[i+1]); err == nil {
					status = StatusFile(fd)
				}
			}
			return ServeAwaitingConfig(ctx, log, path, stdin, status, PrestartPatience)
		}
	}
	if err := serve(context.Background(), log, os.Args[4], os.Stdin); err != nil {
		log.Error().Err(err).Msg("volume serve")
		os.Exit(1)
	}
	os.Exit(0)
}
