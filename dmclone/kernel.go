package dmclone

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
)

// The kernel backend drives the dm-clone target with dmsetup, on hosts whose
// kernel has it (production). It implements Clone like the userspace Engine
// and reports the same Progress record.

// KernelConfig describes one dm-clone device.
type KernelConfig struct {
	// Name is the device-mapper name; the device is /dev/mapper/<Name>.
	Name string
	// Source (read only, e.g. the iSCSI LUN), Dest and Meta are block devices.
	Source, Dest, Meta string
	// Size is the clone's size in bytes: the carried volume size (the LUKS
	// layout's DeviceSize), never a local default. A multiple of 512; Source
	// and Dest must be at least this large.
	Size int64
	// RegionSize in bytes: a power of two from 4 KiB to 1 GiB; 0 = 4 KiB.
	RegionSize int64
	// Tunables become hydration_batch_size and hydration_threshold; the zero
	// BatchRegions and InFlight take DefaultTunables' values (dm-clone's own
	// defaults of 1 region are far too slow over iSCSI). RateLimitBytesPerSec, MinShare and
	// IdleBatchRegions have no dm-clone equivalent and are ignored.
	Tunables Tunables
	// PollInterval is how often status is read (default 1 s).
	PollInterval time.Duration
	// StallAfter is how long hydration may make no progress before Progress
	// reports it stalled (default 30 s). dm-clone retries a failed or hung
	// source read forever, so this is the only way anyone learns of it.
	StallAfter time.Duration
	// Dmsetup is the dmsetup binary (default "dmsetup" on PATH).
	Dmsetup string
}

// KernelStatus is one parsed dm-clone status line.
type KernelStatus struct {
	MetadataBlockSectors int64
	MetadataUsedBlocks   int64
	MetadataTotalBlocks  int64
	RegionSectors        int64
	HydratedRegions      int64
	TotalRegions         int64
	HydratingRegions     int64
	Features             []string // no_hydration, no_discard_passdown
	HydrationThreshold   int64
	HydrationBatchSize   int64
	Mode                 string // rw, ro, or Fail
}

// HydrationEnabled is false while the no_hydration feature is set.
func (s KernelStatus) HydrationEnabled() bool {
	for _, f := range s.Features {
		if f == "no_hydration" {
			return false
		}
	}
	return true
}

// ErrKernelFailed is the status dm-clone reports once its metadata device
// failed ("Fail") or it could not read its counters ("Error").
var ErrKernelFailed = errors.New("dm-clone reports its metadata failed")

// ParseKernelStatus parses dm-clone's status, either the whole line of
// `dmsetup status <name>` ("0 <len> clone <fields>") or the fields alone:
//
//	<metadata block size> <#used metadata blocks>/<#total metadata blocks>
//	<region size> <#hydrated regions>/<#total regions> <#hydrating regions>
//	<#features> <features>* <#core args> <core args>* <clone metadata mode>
func ParseKernelStatus(line string) (KernelStatus, error) {
	var s KernelStatus
	f := strings.Fields(line)
	if len(f) >= 3 && f[2] == "clone" {
		if _, err := strconv.ParseUint(f[0], 10, 64); err == nil {
			f = f[3:]
		}
	} else if len(f) >= 3 && isUint(f[0]) && isUint(f[1]) {
		return s, fmt.Errorf("dm-clone status: target is %q, not clone", f[2])
	}
	if len(f) == 1 && (f[0] == "Fail" || f[0] == "Error") {
		s.Mode = "Fail"
		return s, fmt.Errorf("%w (status %q): the clone must be torn down and rebuilt", ErrKernelFailed, f[0])
	}
	bad := func(what string) (KernelStatus, error) {
		return KernelStatus{}, fmt.Errorf("dm-clone status %q: %s", truncate(line, 200), what)
	}
	if len(f) < 8 {
		return bad("too few fields")
	}
	var err error
	if s.MetadataBlockSectors, err = parseCount(f[0]); err != nil {
		return bad("metadata block size: " + err.Error())
	}
	if s.MetadataUsedBlocks, s.MetadataTotalBlocks, err = parseRatio(f[1]); err != nil {
		return bad("metadata blocks: " + err.Error())
	}
	if s.RegionSectors, err = parseCount(f[2]); err != nil || s.RegionSectors == 0 {
		return bad("region size is not a positive number")
	}
	if s.HydratedRegions, s.TotalRegions, err = parseRatio(f[3]); err != nil {
		return bad("regions: " + err.Error())
	}
	if s.HydratingRegions, err = parseCount(f[4]); err != nil {
		return bad("hydrating regions: " + err.Error())
	}
	i := 5
	n, err := parseCount(f[i])
	if err != nil || n > int64(len(f)-i-1) {
		return bad("feature count")
	}
	s.Features = append([]string(nil), f[i+1:i+1+int(n)]...)
	i += 1 + int(n)
	if i >= len(f) {
		return bad("core argument count missing")
	}
	n, err = parseCount(f[i])
	if err != nil || n%2 != 0 || n > int64(len(f)-i-1) {
		return bad("core argument count")
	}
	core := f[i+1 : i+1+int(n)]
	i += 1 + int(n)
	for j := 0; j < len(core); j += 2 {
		v, err := parseCount(core[j+1])
		if err != nil {
			return bad(core[j] + ": " + err.Error())
		}
		switch core[j] {
		case "hydration_threshold":
			s.HydrationThreshold = v
		case "hydration_batch_size":
			s.HydrationBatchSize = v
		}
	}
	if i != len(f)-1 {
		return bad("expected the metadata mode as the last field")
	}
	switch s.Mode = f[i]; s.Mode {
	case "rw", "ro":
	case "Fail":
		return s, fmt.Errorf("%w (mode Fail): the clone must be torn down and rebuilt", ErrKernelFailed)
	default:
		return bad("unknown metadata mode " + s.Mode)
	}
	if s.HydratedRegions > s.TotalRegions {
		return bad("more regions hydrated than exist")
	}
	return s, nil
}

func isUint(s string) bool { _, err := strconv.ParseUint(s, 10, 64); return err == nil }

func parseCount(s string) (int64, error) {
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%q is not a count", s)
	}
	return v, nil
}

func parseRatio(s string) (int64, int64, error) {
	a, b, ok := strings.Cut(s, "/")
	if !ok {
		return 0, 0, fmt.Errorf("%q is not a/b", s)
	}
	x, err := parseCount(a)
	if err != nil {
		return 0, 0, err
	}
	y, err := parseCount(b)
	if err != nil {
		return 0, 0, err
	}
	return x, y, nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// Progress converts a status into the record the userspace engine reports.
// Byte counters the kernel does not keep stay zero; rate, ETA and stall are
// filled in by the poller that compares successive statuses.
func (s KernelStatus) Progress() Progress {
	p := Progress{
		RegionSize:       s.RegionSectors * 512,
		TotalRegions:     s.TotalRegions,
		HydratedRegions:  s.HydratedRegions,
		HydratingRegions: s.HydratingRegions,
		HydrationEnabled: s.HydrationEnabled(),
		Complete:         s.TotalRegions > 0 && s.HydratedRegions == s.TotalRegions,
	}
	if s.HydrationBatchSize > 0 {
		p.Tunables.BatchRegions = int(s.HydrationBatchSize)
		p.Tunables.InFlight = int(max(1, s.HydrationThreshold/s.HydrationBatchSize))
	}
	return p
}

// kernelTunables maps ferry's tunables onto dm-clone's: a batch is
// hydration_batch_size contiguous regions, and hydration_threshold bounds
// the regions in flight, so InFlight batches need InFlight×batch regions.
func kernelTunables(t Tunables) (threshold, batch int64) {
	batch = int64(t.BatchRegions)
	threshold = batch * int64(t.InFlight)
	return threshold, batch
}

// KernelTable is the dm-clone table line for cfg, with hydration off:
//
//	0 <sectors> clone <meta> <dest> <source> <region sectors> 1 no_hydration
//	  4 hydration_threshold <n> hydration_batch_size <m>
func KernelTable(cfg KernelConfig) (string, error) {
	if err := cfg.normalize(); err != nil {
		return "", err
	}
	thr, batch := kernelTunables(cfg.Tunables)
	return fmt.Sprintf("0 %d clone %s %s %s %d 1 no_hydration 4 hydration_threshold %d hydration_batch_size %d",
		cfg.Size/512, cfg.Meta, cfg.Dest, cfg.Source, cfg.RegionSize/512, thr, batch), nil
}

// KernelMetadataSize is a safe size for the metadata device of a clone of
// size bytes: the region bitmap twice over (copy-on-write commits) plus
// 4 MiB for the superblock, space maps and btree, in 4 KiB blocks.
func KernelMetadataSize(size, regionSize int64) int64 {
	if regionSize <= 0 {
		regionSize = minRegionSize
	}
	regions := (size + regionSize - 1) / regionSize
	n := 4<<20 + 2*((regions+7)/8)
	return (n + 4095) / 4096 * 4096
}

func (cfg *KernelConfig) normalize() error {
	if cfg.RegionSize == 0 {
		cfg.RegionSize = minRegionSize
	}
	if err := validRegionSize(cfg.RegionSize); err != nil {
		return fmt.Errorf("dm-clone %s: %w", cfg.Name, err)
	}
	// Like the engine: zero batch size and parallelism take the defaults.
	cfg.Tunables = cfg.Tunables.withDefaults(cfg.RegionSize)
	if err := cfg.Tunables.validate(); err != nil {
		return fmt.Errorf("dm-clone %s: %w", cfg.Name, err)
	}
	switch {
	case cfg.Name == "" || strings.ContainsAny(cfg.Name, " \t\n/"):
		return fmt.Errorf("dm-clone name %q: must be non-empty, without spaces or slashes", cfg.Name)
	case cfg.Size <= 0 || cfg.Size%512 != 0:
		return fmt.Errorf("dm-clone %s: size %d is not a positive multiple of 512 bytes", cfg.Name, cfg.Size)
	case (cfg.Size+cfg.RegionSize-1)/cfg.RegionSize > maxRegions:
		return fmt.Errorf("dm-clone %s: %d bytes in %d-byte regions is more than 2^31 regions: use larger regions", cfg.Name, cfg.Size, cfg.RegionSize)
	}
	for _, d := range []struct{ what, path string }{{"source", cfg.Source}, {"destination", cfg.Dest}, {"metadata", cfg.Meta}} {
		if d.path == "" || strings.ContainsAny(d.path, " \t\n") {
			return fmt.Errorf("dm-clone %s: %s device %q must be a path without spaces", cfg.Name, d.what, d.path)
		}
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = time.Second
	}
	if cfg.StallAfter <= 0 {
		cfg.StallAfter = 30 * time.Second
	}
	if cfg.Dmsetup == "" {
		cfg.Dmsetup = "dmsetup"
	}
	return nil
}

// dmRunner runs dmsetup; tests substitute it.
type dmRunner func(ctx context.Context, args ...string) (string, error)

func execDmsetup(bin string) dmRunner {
	return func(ctx context.Context, args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, bin, args...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			return out.String(), fmt.Errorf("dmsetup %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
		}
		return out.String(), nil
	}
}

// KernelClone is a dm-clone device driven through dmsetup.
type KernelClone struct {
	log zerolog.Logger
	cfg KernelConfig
	dm  dmRunner

	mu        sync.Mutex
	last      Progress
	lastErr   error
	moved     time.Time // when the hydrated count last changed (or hydration was enabled)
	prevHyd   int64
	rate      kernelRate
	stall     string
	dissolved bool
	closed    bool

	done     chan struct{}
	doneOnce sync.Once
	stop     chan struct{}
	wg       sync.WaitGroup
}

var _ Clone = (*KernelClone)(nil)

// CreateKernel creates the dm-clone device with hydration off, or adopts the
// existing device of that name if it is already a clone of the same size (an
// agent restarted mid-migration), and starts polling its status.
func CreateKernel(ctx context.Context, log zerolog.Logger, cfg KernelConfig) (*KernelClone, error) {
	if err := cfg.normalize(); err != nil {
		return nil, err
	}
	return createKernel(ctx, log, cfg, execDmsetup(cfg.Dmsetup))
}

func createKernel(ctx context.Context, log zerolog.Logger, cfg KernelConfig, dm dmRunner) (*KernelClone, error) {
	table, err := KernelTable(cfg)
	if err != nil {
		return nil, err
	}
	k := &KernelClone{log: log, cfg: cfg, dm: dm, done: make(chan struct{}), stop: make(chan struct{})}
	if out, err := dm(ctx, "table", cfg.Name); err == nil {
		f := strings.Fields(out)
		if len(f) < 3 || f[2] != "clone" || f[1] != strconv.FormatInt(cfg.Size/512, 10) {
			return nil, fmt.Errorf("dm-clone %s: a device of that name exists with table %q; remove it (dmsetup remove %s) or pick another name", cfg.Name, strings.TrimSpace(out), cfg.Name)
		}
		log.Info().Str("name", cfg.Name).Msg("adopting existing dm-clone device")
	} else {
		if _, err := dm(ctx, "create", cfg.Name, "--table", table); err != nil {
			return nil, fmt.Errorf("creating dm-clone %s (is the dm-clone module loaded? modprobe dm-clone): %w", cfg.Name, err)
		}
		log.Info().Str("name", cfg.Name).Str("table", table).Msg("dm-clone created, hydration off")
	}
	if err := k.poll(ctx); err != nil {
		_, _ = dm(ctx, "remove", cfg.Name)
		return nil, err
	}
	k.wg.Add(1)
	go k.poller()
	return k, nil
}

// Path is the device node of the clone (and of the linear device after Dissolve).
func (k *KernelClone) Path() string { return "/dev/mapper/" + k.cfg.Name }

// Name is the device-mapper name.
func (k *KernelClone) Name() string { return k.cfg.Name }

func (k *KernelClone) message(msg ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := k.dm(ctx, append([]string{"message", k.cfg.Name, "0"}, msg...)...)
	if err != nil {
		return fmt.Errorf("dm-clone %s: %w", k.cfg.Name, err)
	}
	return k.poll(ctx)
}

// EnableHydration starts dm-clone's background copy.
func (k *KernelClone) EnableHydration() error {
	k.mu.Lock()
	k.moved = time.Now()
	k.mu.Unlock()
	return k.message("enable_hydration")
}

// DisableHydration stops the background copy; reads still hydrate on demand.
func (k *KernelClone) DisableHydration() error { return k.message("disable_hydration") }

// SetTunables sets hydration_batch_size and hydration_threshold.
func (k *KernelClone) SetTunables(t Tunables) error {
	t = t.withDefaults(k.cfg.RegionSize)
	if err := t.validate(); err != nil {
		return fmt.Errorf("dm-clone %s: %w", k.cfg.Name, err)
	}
	thr, batch := kernelTunables(t)
	// Threshold first when growing, batch first when shrinking, so the
	// batch never exceeds the threshold in between.
	steps := [][]string{{"hydration_threshold", fmt.Sprint(thr)}, {"hydration_batch_size", fmt.Sprint(batch)}}
	if batch < int64(k.Progress().Tunables.BatchRegions) {
		steps[0], steps[1] = steps[1], steps[0]
	}
	for _, s := range steps {
		if err := k.message(s...); err != nil {
			return err
		}
	}
	k.mu.Lock()
	k.cfg.Tunables = t
	k.mu.Unlock()
	return nil
}

// Status reads and parses the current status without flushing metadata.
func (k *KernelClone) Status(ctx context.Context) (KernelStatus, error) {
	out, err := k.dm(ctx, "status", "--noflush", k.cfg.Name)
	if err != nil {
		return KernelStatus{}, fmt.Errorf("dm-clone %s status: %w", k.cfg.Name, err)
	}
	s, err := ParseKernelStatus(strings.TrimSpace(out))
	if err != nil {
		return s, fmt.Errorf("dm-clone %s: %w", k.cfg.Name, err)
	}
	return s, nil
}

// poll reads the status once and updates progress, rate and stall.
func (k *KernelClone) poll(ctx context.Context) error {
	s, err := k.Status(ctx)
	now := time.Now()
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.dissolved {
		return nil
	}
	if err != nil {
		k.lastErr = err
		k.stall = err.Error()
		k.last.Stalled, k.last.StalledReason = true, k.stall
		return err
	}
	k.lastErr = nil
	p := s.Progress()
	if k.moved.IsZero() {
		k.moved = now
		k.prevHyd = p.HydratedRegions
	}
	if p.HydratedRegions != k.prevHyd {
		k.rate.add(now, p.HydratedRegions*p.RegionSize)
		k.prevHyd = p.HydratedRegions
		k.moved = now
	}
	k.stall = ""
	if p.HydrationEnabled && !p.Complete && now.Sub(k.moved) >= k.cfg.StallAfter {
		k.stall = fmt.Sprintf("no region hydrated for %s (%d of %d done); dm-clone retries a failing source forever: check the source device and its iSCSI session",
			now.Sub(k.moved).Round(time.Second), p.HydratedRegions, p.TotalRegions)
	}
	p.Stalled, p.StalledReason = k.stall != "", k.stall
	p.RateBPS = k.rate.rate()
	if p.RateBPS > 0 && !p.Complete {
		left := float64((p.TotalRegions - p.HydratedRegions) * p.RegionSize)
		p.ETA = time.Duration(left / p.RateBPS * float64(time.Second))
	}
	k.last = p
	if p.Complete {
		k.doneOnce.Do(func() { close(k.done) })
	}
	return nil
}

func (k *KernelClone) poller() {
	defer k.wg.Done()
	t := time.NewTicker(k.cfg.PollInterval)
	defer t.Stop()
	wasStalled := false
	for {
		select {
		case <-k.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := k.poll(ctx)
		cancel()
		p := k.Progress()
		switch {
		case err != nil:
			k.log.Warn().Err(err).Str("name", k.cfg.Name).Msg("dm-clone status")
		case p.Stalled && !wasStalled:
			k.log.Warn().Str("name", k.cfg.Name).Str("reason", p.StalledReason).Msg("hydration stalled")
		case !p.Stalled && wasStalled:
			k.log.Info().Str("name", k.cfg.Name).Msg("hydration moving again")
		}
		wasStalled = p.Stalled
	}
}

// Progress is the last polled state.
func (k *KernelClone) Progress() Progress {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.last
}

// Stalled reports whether hydration stopped making progress, and why.
func (k *KernelClone) Stalled() (bool, string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.stall != "", k.stall
}

// Done is closed once every region is hydrated.
func (k *KernelClone) Done() <-chan struct{} { return k.done }

// Dissolve replaces the clone by a linear mapping of the destination under
// the same name (suspend, load linear, resume), so its users keep their
// open device. It needs every region hydrated. The returned device is the
// /dev/mapper node, opened read-write; the mapping stays until RemoveKernel.
func (k *KernelClone) Dissolve() (blockdev.Device, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	k.mu.Lock()
	dissolved := k.dissolved
	k.mu.Unlock()
	if !dissolved {
		// Flush the metadata: a completion seen without a flush must be
		// committed before the clone target goes away.
		out, err := k.dm(ctx, "status", k.cfg.Name)
		if err != nil {
			return nil, fmt.Errorf("dm-clone %s: %w", k.cfg.Name, err)
		}
		s, err := ParseKernelStatus(strings.TrimSpace(out))
		if err != nil {
			return nil, fmt.Errorf("dm-clone %s: %w", k.cfg.Name, err)
		}
		if !s.Progress().Complete {
			return nil, fmt.Errorf("dm-clone %s: %w: %d of %d regions hydrated; wait for Done", k.cfg.Name, ErrNotHydrated, s.HydratedRegions, s.TotalRegions)
		}
		linear := fmt.Sprintf("0 %d linear %s 0", k.cfg.Size/512, k.cfg.Dest)
		if _, err := k.dm(ctx, "suspend", k.cfg.Name); err != nil {
			return nil, fmt.Errorf("dissolving dm-clone %s: %w", k.cfg.Name, err)
		}
		if _, err := k.dm(ctx, "load", k.cfg.Name, "--table", linear); err != nil {
			// Resume the clone as it was: the device must not stay suspended.
			_, rerr := k.dm(ctx, "resume", k.cfg.Name)
			return nil, fmt.Errorf("dissolving dm-clone %s: loading linear table: %w (resumed the clone: %v)", k.cfg.Name, err, rerr)
		}
		if _, err := k.dm(ctx, "resume", k.cfg.Name); err != nil {
			return nil, fmt.Errorf("dissolving dm-clone %s: resuming with the linear table (device left suspended: run dmsetup resume %s): %w", k.cfg.Name, k.cfg.Name, err)
		}
		k.mu.Lock()
		k.dissolved = true
		k.mu.Unlock()
		k.log.Info().Str("name", k.cfg.Name).Str("table", linear).Msg("dm-clone dissolved into a linear mapping of the destination")
	}
	return blockdev.OpenFile(k.Path(), false)
}

// Close stops polling. Before Dissolve it removes the clone device (its
// users must have closed it); after Dissolve the linear mapping belongs to
// the caller and stays.
func (k *KernelClone) Close() error {
	k.mu.Lock()
	if k.closed {
		k.mu.Unlock()
		return nil
	}
	k.closed = true
	dissolved := k.dissolved
	k.mu.Unlock()
	close(k.stop)
	k.wg.Wait()
	if dissolved {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return removeDevice(ctx, k.dm, k.cfg.Name)
}

// RemoveKernel removes a device-mapper device by name (the clone, or the
// linear mapping left by Dissolve). A missing device is not an error.
func RemoveKernel(ctx context.Context, dmsetup, name string) error {
	if dmsetup == "" {
		dmsetup = "dmsetup"
	}
	return removeDevice(ctx, execDmsetup(dmsetup), name)
}

func removeDevice(ctx context.Context, dm dmRunner, name string) error {
	if _, err := dm(ctx, "info", name); err != nil {
		return nil // already gone
	}
	if _, err := dm(ctx, "remove", "--retry", name); err != nil {
		return fmt.Errorf("removing %s (is it still open or mounted?): %w", name, err)
	}
	return nil
}

// kernelRate estimates hydration bytes per second from the last few polls
// that saw the hydrated count change.
type kernelRate struct {
	t [8]time.Time
	n [8]int64
	i int // samples taken
}

func (r *kernelRate) add(t time.Time, cumulative int64) {
	r.t[r.i%len(r.t)], r.n[r.i%len(r.n)] = t, cumulative
	r.i++
}

func (r *kernelRate) rate() float64 {
	if r.i < 2 {
		return 0
	}
	last := (r.i - 1) % len(r.t)
	first := 0
	if r.i > len(r.t) {
		first = r.i % len(r.t)
	}
	dt := r.t[last].Sub(r.t[first]).Seconds()
	if dt <= 0 || r.n[last] < r.n[first] {
		return 0
	}
	return float64(r.n[last]-r.n[first]) / dt
}
