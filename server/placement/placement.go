// Package placement chooses target workers for the machines of a drained
// worker. It is a pure function of a snapshot of the replicated state, so
// the leader's drainer and `ferry drain --plan` give the same answer and
// tests need no cluster.
//
// Policy: least loaded. A target is scored by its inbound migrations
// (running and placed in this pass) over its inbound slots, then by the
// free bytes it keeps after the volume lands. Spreading, not bin packing,
// because a drain is limited by links and disks: placing many hydrations on
// one target shares its link and its disk between them and serialises them
// on its inbound slots, while spare targets idle; and a drain should leave
// headroom everywhere for the next one. Machines are placed largest volume
// first (longest hydration first shortens the drain and fits big volumes
// while there is still room).
package placement

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// Input is what placement reads; the caller takes it from the store.
type Input struct {
	Now      time.Time
	Source   fsm.Worker
	Workers  []fsm.Worker              // every worker (the source among them is skipped)
	Machines []fsm.Machine             // the machines to place (on the source)
	Volumes  map[string]fsm.Volume     // by ID: at least the volumes of Machines and of Active's
	Active   []*fsm.Migration          // every non-terminal migration (load and reserved space)
	Groups   map[string]map[string]int // worker -> group -> machines of that group on it (only groups in Machines matter)
}

// Options are a drain's limits.
type Options struct {
	Targets      []string // allowed targets; empty: any
	Parallel     int      // migrations out of the source at once (0: unlimited)
	BandwidthBPS int64    // budget of the source's link for hydrations (0: the source's report, or none)
	// Whole plans every machine at once ignoring the limits that only
	// delay a start (slots, parallel, bandwidth): what --plan prints.
	Whole bool
	// Lead is how long a migration takes from its plan to hydrating (the
	// steps before cutover; the drainer measures it on the drain's own
	// migrations): a hydration whose reported ETA is shorter no longer
	// counts against --parallel and the budget, so the next one reaches
	// its hydration as this one ends and the link does not idle between
	// them. 0: DefaultLead.
	Lead time.Duration
}

// DefaultLead is Options.Lead's default.
const DefaultLead = 2 * time.Second

func (o Options) lead() time.Duration {
	if o.Lead > 0 {
		return o.Lead
	}
	return DefaultLead
}

// finishing reports whether m's hydration ends within lead, by its last
// progress report (ETA then, minus the time since).
func finishing(m *fsm.Migration, now time.Time, lead time.Duration) bool {
	p := m.Progress
	if m.State != fsm.Hydrating || p == nil || p.ETASeconds <= 0 || p.UpdatedAt.IsZero() {
		return false
	}
	return time.Duration(p.ETASeconds)*time.Second-now.Sub(p.UpdatedAt) <= lead
}

// Margin is the free space a target must keep beyond a volume: a tenth of
// the volume, at least 1 GiB (file system metadata, clone bitmap, growth
// while it hydrates).
func Margin(size int64) int64 { return max(size/10, 1<<30) }

// Placement is one decision: machine goes to target, and why.
type Placement struct {
	Machine string `json:"machine"`
	Volume  string `json:"volume"`
	Bytes   int64  `json:"bytes"`
	Target  string `json:"target"`
	Reason  string `json:"reason"`
}

// Waiting is a machine that cannot start now, and the constraint that says so.
type Waiting struct {
	Machine string `json:"machine"`
	Bytes   int64  `json:"bytes"`
	Reason  string `json:"reason"`
}

type target struct {
	w       fsm.Worker
	in, lim int   // inbound migrations (running + placed now), inbound slots
	free    int64 // reported free bytes minus what running and placed inbound volumes take; -1: not reported
	groups  map[string]int
	hydrate int64
}

// Plan places as many machines as the limits allow now (all of them with
// Whole) and says for each of the others why it waits.
func Plan(in Input, o Options) ([]Placement, []Waiting) {
	allowed := map[string]bool{}
	for _, t := range o.Targets {
		allowed[t] = true
	}
	size := func(volID string) int64 { return in.Volumes[volID].Size }

	// Candidates: alive, not cordoned, not the source, allowed.
	var cands []*target
	byName := map[string]*target{}
	var dead, cordoned, notAllowed int
	for _, w := range in.Workers {
		switch {
		case w.Name == in.Source.Name:
			continue
		case len(allowed) > 0 && !allowed[w.Name]:
			notAllowed++
			continue
		case !w.Alive(in.Now):
			dead++
			continue
		case w.Cordoned:
			cordoned++
			continue
		}
		t := &target{w: w, lim: w.LimitIn(), free: -1, groups: in.Groups[w.Name]}
		if w.Report != nil && (w.Report.TotalBytes > 0 || w.Report.FreeBytes > 0) {
			t.free = w.Report.FreeBytes
		}
		if w.Report != nil {
			t.hydrate = w.Report.HydrateBPS
		}
		cands = append(cands, t)
		byName[w.Name] = t
	}
	sort.Slice(cands, func(i, j int) bool { return cands[i].w.Name < cands[j].w.Name })

	// Load: running migrations hold inbound slots and their volume's space
	// on the target until they end (reported free space may not show it yet).
	// On the source, every active migration holds an outbound slot (the
	// store's admission), but only those not yet hydrated use its link:
	// --parallel and the bandwidth budget count those, so the next
	// migration starts while the last ones wait for their completion.
	outAll, outRunning := 0, 0
	var outBPS int64
	for _, m := range in.Active {
		if t := byName[m.Target]; t != nil {
			t.in++
			if t.free >= 0 {
				t.free -= size(m.Volume)
			}
		}
		if m.Source == in.Source.Name {
			outAll++
			if usesLink(m.State) && !finishing(m, in.Now, o.lead()) {
				outRunning++
				outBPS += rateOf(m, byName)
			}
		}
	}

	budget := o.BandwidthBPS
	if budget == 0 && in.Source.Report != nil {
		budget = in.Source.Report.LinkBPS
	}
	slots := in.Source.LimitOut()
	outLim := slots
	if o.Parallel > 0 {
		outLim = o.Parallel
	}

	ms := append([]fsm.Machine(nil), in.Machines...)
	sort.Slice(ms, func(i, j int) bool {
		si, sj := size(ms[i].Volume), size(ms[j].Volume)
		if si != sj {
			return si > sj
		}
		return ms[i].ID < ms[j].ID
	})

	var placed []Placement
	var waiting []Waiting
	srcDead := !o.Whole && !in.Source.Alive(in.Now)
	for _, m := range ms {
		sz := size(m.Volume)
		if srcDead {
			waiting = append(waiting, Waiting{m.ID, sz, "source worker " + in.Source.Name + " has no valid lease: its agent must run to stop and export the machine"})
			continue
		}
		if v, ok := in.Volumes[m.Volume]; !ok || v.State != fsm.VolCreated && v.State != fsm.VolHydrating {
			waiting = append(waiting, Waiting{m.ID, sz, fmt.Sprintf("volume %s is %q: only a created volume can be migrated", m.Volume, v.State)})
			continue
		}
		if !o.Whole {
			if outAll >= slots {
				waiting = append(waiting, Waiting{m.ID, sz, fmt.Sprintf("source %s holds %d of its %d outbound slots", in.Source.Name, outAll, slots)})
				continue
			}
			if outRunning >= outLim {
				waiting = append(waiting, Waiting{m.ID, sz, fmt.Sprintf("source %s runs %d of %d outbound migrations", in.Source.Name, outRunning, outLim)})
				continue
			}
		}
		need := sz + Margin(sz)
		var fits []*target
		var full, noRoom, grouped int
		var best int64 = -1
		bestName := ""
		for _, t := range cands {
			if t.free >= 0 && t.free < need {
				noRoom++
				if t.free > best {
					best, bestName = t.free, t.w.Name
				}
				continue
			}
			if m.Group != "" && t.groups[m.Group] > 0 {
				grouped++
				continue
			}
			if !o.Whole && t.in >= t.lim {
				full++
				continue
			}
			fits = append(fits, t)
		}
		if len(fits) == 0 {
			waiting = append(waiting, Waiting{m.ID, sz, refusal(sz, need, len(cands), noRoom, grouped, full, dead, cordoned, notAllowed, best, bestName, m.Group)})
			continue
		}
		est := estimate(fits, budget, outLim)
		if !o.Whole && budget > 0 && outRunning > 0 && outBPS+est > budget {
			waiting = append(waiting, Waiting{m.ID, sz, fmt.Sprintf("bandwidth budget of %s: %s/s, %s/s in use by %d hydrations", in.Source.Name, Bytes(budget), Bytes(outBPS), outRunning)})
			continue
		}
		sort.SliceStable(fits, func(i, j int) bool {
			li, lj := load(fits[i]), load(fits[j])
			if li != lj {
				return li < lj
			}
			return fits[i].free > fits[j].free
		})
		t := fits[0]
		reason := fmt.Sprintf("least loaded of %d with room: %d/%d inbound", len(fits), t.in, t.lim)
		if t.free >= 0 {
			reason += fmt.Sprintf(", %s free, %s after", Bytes(t.free), Bytes(t.free-sz))
			t.free -= sz
		} else {
			reason += ", free space not reported"
		}
		if m.Group != "" {
			reason += ", no machine of group " + m.Group + " there"
			if t.groups == nil {
				t.groups = map[string]int{}
			}
			t.groups[m.Group]++
		}
		t.in++
		outAll++
		outRunning++
		outBPS += rateFor(t, budget, outLim)
		placed = append(placed, Placement{Machine: m.ID, Volume: m.Volume, Bytes: sz, Target: t.w.Name, Reason: reason})
	}
	return placed, waiting
}

// usesLink reports whether a migration in st still needs its source's
// link: until it is hydrated, unless it is rolling back.
func usesLink(st fsm.State) bool {
	return !st.Terminal() && st != fsm.Hydrated && st != fsm.SourceReleased && st != fsm.RollingBack
}

func load(t *target) float64 { return float64(t.in) / float64(max(t.lim, 1)) }

// rateFor is the hydration rate a migration to t is expected to take: the
// target's reported clone rate, or an equal share of the budget.
func rateFor(t *target, budget int64, parallel int) int64 {
	if t != nil && t.hydrate > 0 {
		return t.hydrate
	}
	if budget > 0 {
		return budget / int64(max(parallel, 1))
	}
	return 0
}

func estimate(fits []*target, budget int64, parallel int) int64 {
	var lo int64 = -1
	for _, t := range fits {
		if r := rateFor(t, budget, parallel); lo < 0 || r < lo {
			lo = r
		}
	}
	return max(lo, 0)
}

// rateOf is what a running migration takes of its source's link: its
// reported rate while hydrating, else what its target is expected to take.
func rateOf(m *fsm.Migration, byName map[string]*target) int64 {
	if m.Progress != nil && m.Progress.RateBPS > 0 && m.State == fsm.Hydrating {
		return m.Progress.RateBPS
	}
	if t := byName[m.Target]; t != nil && t.hydrate > 0 {
		return t.hydrate
	}
	return 0
}

// refusal names the constraint that left no target, most specific first.
func refusal(size, need int64, cands, noRoom, grouped, full, dead, cordoned, notAllowed int, best int64, bestName, group string) string {
	if cands == 0 {
		var why []string
		if dead > 0 {
			why = append(why, fmt.Sprintf("%d without a lease", dead))
		}
		if cordoned > 0 {
			why = append(why, fmt.Sprintf("%d cordoned", cordoned))
		}
		if notAllowed > 0 {
			why = append(why, fmt.Sprintf("%d not in --to", notAllowed))
		}
		if len(why) == 0 {
			return "no other worker is registered"
		}
		return "no worker can take it: " + strings.Join(why, ", ")
	}
	if noRoom == cands {
		s := fmt.Sprintf("no worker has %s free (volume %s + margin %s)", Bytes(need), Bytes(size), Bytes(need-size))
		if bestName != "" {
			s += fmt.Sprintf("; most free: %s on %s", Bytes(max(best, 0)), bestName)
		}
		return s
	}
	if noRoom+grouped == cands {
		return fmt.Sprintf("every worker with %s free already holds a machine of group %s", Bytes(need), group)
	}
	return fmt.Sprintf("every worker with room is at its inbound limit (%d full, %d without room, %d with group %q)", full, noRoom, grouped, group)
}

// Bytes renders a size the way people read it ("120 GiB").
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	v := float64(n) / float64(div)
	if v == float64(int64(v)) {
		return fmt.Sprintf("%d %ciB", int64(v), "KMGTPE"[exp])
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTPE"[exp])
}
