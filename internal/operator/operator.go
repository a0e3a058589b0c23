// Package operator holds what the operator's commands do over the API
// client, as functions the CLI calls and tests drive with a fake: create a
// volume, make the recovery key and recover a volume with it, run a machine at its 6PN address, plan and follow
// a migration. Each takes the few client methods it needs as an interface
// (*api.Client has them all).
package operator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/bytesize"
	"github.com/ferry-dev/ferry/machine"
	"github.com/ferry-dev/ferry/netrewrite"
)

// Errors the CLI maps to its exit codes: ErrInvalid for bad input (usage),
// ErrRefused for a request the registries say cannot be done.
var (
	ErrInvalid = errors.New("invalid request")
	ErrRefused = errors.New("refused")
)

// VolumeClient is what CreateVolume needs.
type VolumeClient interface {
	CreateVolume(ctx context.Context, v fsm.Volume) (*fsm.Volume, error)
	GetVolume(ctx context.Context, id string) (*fsm.Volume, error)
}

// CreateVolume registers volume id of size bytes on worker and, when
// wait > 0, waits until the worker's agent formatted it. The agent makes
// the passphrase and seals it; it never passes through here.
func CreateVolume(ctx context.Context, c VolumeClient, id, worker string, size int64, wait time.Duration) (*fsm.Volume, error) {
	if worker == "" {
		return nil, fmt.Errorf("%w: volume %s: a worker is required", ErrInvalid, id)
	}
	if size <= 0 {
		return nil, fmt.Errorf("%w: volume %s: size %d must be positive", ErrInvalid, id, size)
	}
	v, err := c.CreateVolume(ctx, fsm.Volume{ID: id, Worker: worker, Size: size, State: fsm.VolCreating})
	if err != nil {
		return nil, err
	}
	if wait <= 0 {
		return v, nil
	}
	return WaitVolume(ctx, c, v.ID, fsm.VolCreated, wait)
}

// ExtendClient is what ExtendVolume needs.
type ExtendClient interface {
	ExtendVolume(ctx context.Context, id string, size int64) (*fsm.Volume, error)
	GetVolume(ctx context.Context, id string) (*fsm.Volume, error)
}

// ExtendVolume asks for volume id to grow to size bytes and, when wait > 0,
// waits until its worker reported the new size.
func ExtendVolume(ctx context.Context, c ExtendClient, id string, size int64, wait time.Duration) (*fsm.Volume, error) {
	return extendVolume(ctx, c, id, size, wait, 200*time.Millisecond)
}

func extendVolume(ctx context.Context, c ExtendClient, id string, size int64, wait, poll time.Duration) (*fsm.Volume, error) {
	if size <= 0 || size%512 != 0 {
		return nil, fmt.Errorf("%w: volume %s: size %d must be a positive multiple of 512 bytes", ErrInvalid, id, size)
	}
	v, err := c.ExtendVolume(ctx, id, size)
	if err != nil || wait <= 0 {
		return v, err
	}
	deadline := time.Now().Add(wait)
	for !(v.Size >= size && !v.Extending()) {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("volume %s is still %s, growing to %s, after %v: is the agent of worker %s running? (see its log; a worker without CAP_SYS_RESOURCE finishes once the machine stops)",
				id, bytesize.Format(v.Size), bytesize.Format(v.WantSize), wait, v.Worker)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(poll):
		}
		if v, err = c.GetVolume(ctx, id); err != nil {
			return nil, err
		}
	}
	return v, nil
}

// VolumeGetter reads one volume (what waiting needs).
type VolumeGetter interface {
	GetVolume(ctx context.Context, id string) (*fsm.Volume, error)
}

// ForkClient is what ForkVolume needs.
type ForkClient interface {
	ForkVolume(ctx context.Context, source, id, worker string) (*fsm.Volume, error)
	GetVolume(ctx context.Context, id string) (*fsm.Volume, error)
}

// ForkVolume registers id as a copy of source on worker (empty: the
// source's; empty id: source-fork-XXXX), hands the servers a fresh
// passphrase of its own (the worker makes it, seals it and formats the
// copy under a new master key) and, when wait > 0, waits until the copy is made.
func ForkVolume(ctx context.Context, c ForkClient, source, id, worker string, wait time.Duration) (*fsm.Volume, error) {
	if worker == "" {
		src, err := c.GetVolume(ctx, source)
		if err != nil {
			return nil, err
		}
		worker = src.Worker
	}
	if id == "" {
		id = source + "-fork-" + strings.ToLower(fmt.Sprintf("%04x", time.Now().UnixNano()&0xffff))
	}
	v, err := c.ForkVolume(ctx, source, id, worker)
	if err != nil {
		return nil, err
	}
	if wait <= 0 {
		return c.GetVolume(ctx, v.ID)
	}
	return WaitVolume(ctx, c, v.ID, fsm.VolCreated, wait)
}

// WaitVolume polls volume id until it is in state want, for at most timeout.
func WaitVolume(ctx context.Context, c VolumeGetter, id string, want fsm.VolumeState, timeout time.Duration) (*fsm.Volume, error) {
	return waitVolume(ctx, c, id, want, timeout, 200*time.Millisecond)
}

func waitVolume(ctx context.Context, c VolumeGetter, id string, want fsm.VolumeState, timeout, poll time.Duration) (*fsm.Volume, error) {
	deadline := time.Now().Add(timeout)
	for {
		v, err := c.GetVolume(ctx, id)
		if err == nil && v.State == want {
			return v, nil
		}
		if time.Now().After(deadline) {
			st := "unknown"
			if v != nil {
				st = string(v.State)
			}
			return nil, fmt.Errorf("volume %s is still %s after %v: is the agent of its worker running? (see its log)", id, st, timeout)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(poll):
		}
	}
}

// MachineClient is what RunMachine needs.
type MachineClient interface {
	GetWorker(ctx context.Context, name string) (*fsm.Worker, error)
	CreateMachine(ctx context.Context, m fsm.Machine) (*fsm.Machine, error)
}

// MachineRequest is `ferry machine run`.
type MachineRequest struct {
	ID, Worker, Volume string
	Org, Number        uint32 // the ORG and MACHINE bits of the 6PN address
	Spec               machine.Spec
}

// RunMachine checks r, builds the machine's 6PN address from the worker's
// host id and registers the machine as running (its agent starts it).
func RunMachine(ctx context.Context, c MachineClient, r MachineRequest) (*fsm.Machine, error) {
	if err := machine.ValidateID(r.ID); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if r.Worker == "" || r.Volume == "" {
		return nil, fmt.Errorf("%w: machine %s: a worker and a volume are required", ErrInvalid, r.ID)
	}
	if len(r.Spec.Command) == 0 {
		return nil, fmt.Errorf("%w: machine %s: a command is required", ErrInvalid, r.ID)
	}
	if _, err := machine.ParseSignal(r.Spec.KillSignal); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	w, err := c.GetWorker(ctx, r.Worker)
	if err != nil {
		return nil, fmt.Errorf("worker %s: %w", r.Worker, err)
	}
	if w.HostID == 0 {
		return nil, fmt.Errorf("%w: worker %s is not registered with a 6PN host id: start its agent with --host-id", ErrRefused, r.Worker)
	}
	addr, err := netrewrite.Build(r.Org, w.HostID, r.Number)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	r.Spec.ID = r.ID
	spec, err := json.Marshal(r.Spec)
	if err != nil {
		return nil, err
	}
	return c.CreateMachine(ctx, fsm.Machine{ID: r.ID, Worker: r.Worker, Volume: r.Volume, Network: r.Org, MachineNo: r.Number,
		Addr6PN: addr.String(), State: fsm.MachineRunning, Spec: spec})
}

// PlanClient is what MakeMigrationPlan needs.
type PlanClient interface {
	GetMachine(ctx context.Context, id string) (*fsm.Machine, error)
	GetVolume(ctx context.Context, id string) (*fsm.Volume, error)
}

// MigrationPlan describes what a migration would do, from the registries.
type MigrationPlan struct {
	Machine, Volume, Source, Target string
	VolumeSize                      int64
	DataOffset                      int64
	Old6PN                          string
	Locks                           []string
	Steps                           []string
}

// MakeMigrationPlan reads the machine and its volume; it changes nothing.
func MakeMigrationPlan(ctx context.Context, c PlanClient, machineID, target string) (*MigrationPlan, error) {
	m, err := c.GetMachine(ctx, machineID)
	if err != nil {
		return nil, err
	}
	if m.Worker == target {
		return nil, fmt.Errorf("%w: machine %s already runs on %s", ErrRefused, machineID, target)
	}
	v, err := c.GetVolume(ctx, m.Volume)
	if err != nil {
		return nil, err
	}
	p := &MigrationPlan{Machine: m.ID, Volume: v.ID, Source: m.Worker, Target: target, VolumeSize: v.Size, Old6PN: m.Addr6PN,
		Locks: []string{"volume/" + v.ID}}
	if m.Network != 0 {
		p.Locks = append(p.Locks, fmt.Sprintf("network/%d", m.Network))
	}
	if v.Layout != nil {
		p.DataOffset = v.Layout.DataOffset
	}
	for _, t := range fsm.Transitions {
		if t.From[0] == fsm.RollingBack || t.Event == fsm.EvAbort || t.Event == fsm.EvFailed {
			continue
		}
		p.Steps = append(p.Steps, fmt.Sprintf("%-16s %-8s %s", t.To, t.Roles[0], t.Doc))
	}
	return p, nil
}

// Print writes the plan for a person.
func (p *MigrationPlan) Print(w io.Writer) {
	fmt.Fprintf(w, "migrate machine %s (volume %s, %s) from %s to %s\n", p.Machine, p.Volume, bytesize.Format(p.VolumeSize), p.Source, p.Target)
	fmt.Fprintf(w, "  LUKS2 layout carried from the source: data offset %s\n", bytesize.Format(p.DataOffset))
	fmt.Fprintf(w, "  bytes to copy: at most %s; the source's holes (known-zero) and what fstrim frees are skipped\n", bytesize.Format(p.VolumeSize))
	fmt.Fprintf(w, "  6PN: %s moves to the target's host id; the old address keeps answering for the grace period\n", p.Old6PN)
	fmt.Fprintf(w, "  locks: %s\n  steps:\n", strings.Join(p.Locks, ", "))
	for _, s := range p.Steps {
		fmt.Fprintf(w, "    %s\n", s)
	}
	fmt.Fprintln(w, "  abort is safe until cutover (the machine restarts on the source); after cutover only forward")
}

// ProgressLine renders one migration's progress on one line.
func ProgressLine(m *fsm.Migration) string {
	const width = 30
	pct := 0.0
	rate, eta := "", ""
	if m.Progress != nil {
		pct = m.Progress.Percent()
		if m.Progress.RateBPS > 0 {
			rate = bytesize.Format(m.Progress.RateBPS) + "/s"
		}
		if m.Progress.ETASeconds > 0 {
			eta = "ETA " + (time.Duration(m.Progress.ETASeconds) * time.Second).String()
		}
	}
	if m.State == fsm.Hydrated || m.State == fsm.SourceReleased || m.State == fsm.Completed {
		pct = 100
	}
	pct = min(max(pct, 0), 100) // a peer's counters must not break the bar
	n := int(pct / 100 * width)
	bar := strings.Repeat("#", n) + strings.Repeat(".", width-n)
	s := fmt.Sprintf("%-14s %-16s [%s] %5.1f%% %s %s", m.ID, m.State, bar, pct, rate, eta)
	if m.Stalled {
		s += " STALLED: " + m.StallCause
	}
	return strings.TrimRight(s, " ")
}

// MigrationGetter is what FollowMigrations needs.
type MigrationGetter interface {
	GetMigration(ctx context.Context, id string) (*fsm.Migration, error)
}

// FollowMigrations polls the migrations ids until each ends, writing a
// progress line to w when one changes (live: redrawn in place on a
// terminal); it returns the final records by id.
func FollowMigrations(ctx context.Context, c MigrationGetter, w io.Writer, ids []string, live bool) (map[string]*fsm.Migration, error) {
	return followMigrations(ctx, c, w, ids, live, 200*time.Millisecond)
}

func followMigrations(ctx context.Context, c MigrationGetter, w io.Writer, ids []string, live bool, poll time.Duration) (map[string]*fsm.Migration, error) {
	final := map[string]*fsm.Migration{}
	last := map[string]string{}
	for len(final) < len(ids) {
		for _, id := range ids {
			if final[id] != nil {
				continue
			}
			m, err := c.GetMigration(ctx, id)
			if err != nil {
				return final, err
			}
			line := ProgressLine(m)
			if line != last[id] {
				if live {
					fmt.Fprintf(w, "\r\033[K%s", line)
				} else {
					fmt.Fprintln(w, line)
				}
				last[id] = line
			}
			if m.State.Terminal() {
				if live {
					fmt.Fprintln(w)
				}
				final[id] = m
			}
		}
		if len(final) == len(ids) {
			break
		}
		select {
		case <-ctx.Done():
			return final, ctx.Err()
		case <-time.After(poll):
		}
	}
	return final, nil
}

// RolledBack lists the migrations in ms that ended rolled back, as "id:
// reason", sorted; empty when every one completed.
func RolledBack(ms map[string]*fsm.Migration) []string {
	var rolled []string
	for id, m := range ms {
		if m.State == fsm.RolledBack {
			reason := ""
			if m.Rollback != nil {
				reason = ": " + m.Rollback.Reason
			}
			rolled = append(rolled, id+reason)
		}
	}
	sort.Strings(rolled)
	return rolled
}

// MigrationWatcher is what WatchMigration needs.
type MigrationWatcher interface {
	WatchMigration(ctx context.Context, id string, index uint64) (*fsm.Migration, uint64, error)
}

// WatchMigration prints a line per change of migration id until it ends
// (blocking queries: the server answers when the record changes) and
// returns the final record. For a completed migration it also prints the
// downtime.
func WatchMigration(ctx context.Context, c MigrationWatcher, id string, out io.Writer) (*fsm.Migration, error) {
	var idx uint64
	last := ""
	for {
		m, next, err := c.WatchMigration(ctx, id, idx)
		if err != nil {
			return nil, err
		}
		idx = next
		line := fmt.Sprintf("%-16s %s", m.State, ProgressText(m))
		if m.Stalled {
			line += "  STALLED: " + m.StallCause
		}
		if line != last {
			fmt.Fprintf(out, "%s  %s\n", time.Now().Format(time.TimeOnly), line)
			last = line
		}
		if m.State.Terminal() {
			if d, ok := m.Downtime(); ok && m.State == fsm.Completed {
				fmt.Fprintf(out, "completed; downtime %s\n", d)
			}
			return m, nil
		}
	}
}

// Age rounds d to what a person reads at a glance.
func Age(d time.Duration) string {
	switch {
	case d < time.Minute:
		return d.Round(time.Second).String()
	case d < time.Hour:
		return d.Round(time.Minute).String()
	}
	return d.Round(time.Hour).String()
}

// ProgressText is a migration's progress in a few words ("-" before any).
func ProgressText(m *fsm.Migration) string {
	p := m.Progress
	if p == nil || p.TotalBytes == 0 {
		return "-"
	}
	s := fmt.Sprintf("%.0f%%", p.Percent())
	if p.RateBPS > 0 {
		s += fmt.Sprintf(" %.1f MiB/s", float64(p.RateBPS)/(1<<20))
	}
	if p.ETASeconds > 0 && p.HydratedBytes < p.TotalBytes {
		s += " eta " + (time.Duration(p.ETASeconds) * time.Second).String()
	}
	return s
}

// PrintMigrations writes a table of ms, ages relative to now.
func PrintMigrations(w io.Writer, ms []*fsm.Migration, now time.Time) {
	if len(ms) == 0 {
		fmt.Fprintln(w, "no migrations")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tMACHINE\tVOLUME\tSTATE\tSOURCE -> TARGET\tAGE\tPROGRESS\tNOTE")
	for _, m := range ms {
		note := ""
		if m.Stalled {
			note = "STALLED: " + m.StallCause
		} else if m.Rollback != nil {
			note = "rollback: " + m.Rollback.Reason
		} else if m.LastError != "" {
			note = "last error: " + m.LastError
		}
		if len(note) > 60 {
			note = note[:57] + "..."
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s -> %s\t%s\t%s\t%s\n", m.ID, m.Machine, m.Volume, m.State, m.Source, m.Target,
			Age(now.Sub(m.CreatedAt)), ProgressText(m), note)
	}
	tw.Flush()
}

// PrintMigration writes one migration in detail, ages relative to now.
func PrintMigration(w io.Writer, m *fsm.Migration, now time.Time) {
	fmt.Fprintf(w, "migration %s: machine %s, volume %s, %s -> %s\n", m.ID, m.Machine, m.Volume, m.Source, m.Target)
	fmt.Fprintf(w, "state:     %s (age %s, attempts %d)\n", m.State, Age(now.Sub(m.CreatedAt)), m.Attempts)
	if d, ok := m.Downtime(); ok {
		fmt.Fprintf(w, "downtime:  %s as the control plane saw it (source_stopped -> cutover)\n", d)
		// The store sees only its own events, never the machine's writes:
		// it gives a bound for the part it sees and says what is missing.
		// The machine ran until after target_prepared was committed (its
		// stop is the next step) and runs again only after cutover.
		if tp, ok := m.EnteredAt[fsm.TargetPrepared]; ok {
			if co := m.EnteredAt[fsm.Cutover]; co.After(tp) {
				fmt.Fprintf(w, "           the machine's own pause is longer and not recorded here: at most %s from its stop to the\n", co.Sub(tp))
				fmt.Fprintf(w, "           cutover (target_prepared -> cutover), plus its start on %s and its first write;\n", m.Target)
				fmt.Fprintf(w, "           `ferry demo` and `make bench` measure it from the machine's side\n")
			}
		}
	}
	fmt.Fprintf(w, "progress:  %s\n", ProgressText(m))
	if m.Stalled {
		fmt.Fprintf(w, "STALLED:   %s\n", m.StallCause)
	}
	if m.LastError != "" {
		fmt.Fprintf(w, "last error: %s\n", m.LastError)
	}
	if m.Rollback != nil {
		fmt.Fprintf(w, "rollback:  %s (by %s from %s; target torn down %v, source restored %v)\n", m.Rollback.Reason, m.Rollback.By,
			m.Rollback.From, m.Rollback.TargetTornDown, m.Rollback.SourceRestored)
	}
	if m.Export != nil {
		fmt.Fprintf(w, "export:    %s %s\n", m.Export.Portal, m.Export.IQN)
	}
	if m.Old6PN != "" || m.New6PN != "" {
		fmt.Fprintf(w, "6PN:       %s -> %s\n", m.Old6PN, m.New6PN)
	}
	var b strings.Builder
	for _, st := range fsm.AllStates {
		if t, ok := m.EnteredAt[st]; ok {
			fmt.Fprintf(&b, "  %-16s %s\n", st, t.UTC().Format(time.RFC3339Nano))
		}
	}
	fmt.Fprintf(w, "timeline:\n%s", b.String())
}
