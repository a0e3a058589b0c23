package agent

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
)

// fakePrestarter records the early logins asked for; each ends after
// loginTakes (never when negative).
type fakePrestarter struct {
	loginTakes time.Duration
	mu         sync.Mutex
	asked      []datapath.CloneSpec
}

func (p *fakePrestarter) Prestart(context.Context, string) {}
func (p *fakePrestarter) ReleasePrestarted()               {}
func (p *fakePrestarter) PreConnect(_ context.Context, c datapath.CloneSpec) <-chan struct{} {
	p.mu.Lock()
	p.asked = append(p.asked, c)
	p.mu.Unlock()
	done := make(chan struct{})
	if p.loginTakes >= 0 {
		time.AfterFunc(p.loginTakes, func() { close(done) })
	}
	return done
}

func (p *fakePrestarter) spec() []datapath.CloneSpec {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]datapath.CloneSpec(nil), p.asked...)
}

// The target's prepare waits for the source's early export and the login
// to it before it proposes target_prepared (the source's cue to stop the
// machine), and never longer than earlyLoginWait.
func TestLoginBeforePrepared(t *testing.T) {
	layout := &fsm.LUKSLayout{SectorSize: 4096, DataOffset: 16 << 20, PayloadSize: 1 << 30, Cipher: "aes-xts-plain64", KeyBytes: 64}
	for _, c := range []struct {
		name        string
		publishedIn time.Duration // -1: never
		loginTakes  time.Duration // -1: never ends
		wantAsked   bool
		minWait     time.Duration
	}{
		{"export published, login ends", 40 * time.Millisecond, 60 * time.Millisecond, true, 100 * time.Millisecond},
		{"no early export", -1, 0, false, earlyLoginWait},
		{"the login does not end", 0, -1, true, earlyLoginWait},
	} {
		t.Run(c.name, func(t *testing.T) {
			cp := &fakeCP{m: &fsm.Migration{ID: "mig-1", Machine: "m1", Volume: "v1", Source: "w-a", Target: "w-b", State: fsm.Planned, Layout: layout}}
			a := newTestAgent(t, cp, "w-b")
			ps := &fakePrestarter{loginTakes: c.loginTakes}
			if c.publishedIn >= 0 {
				time.AfterFunc(c.publishedIn, func() {
					cp.mu.Lock()
					cp.m.Export = &fsm.Export{Portal: "[fd00::1]:3260", IQN: "iqn.2026-12.dev.ferry:mig-1"}
					cp.mu.Unlock()
				})
			}
			m, _ := cp.GetMigration(context.Background(), "mig-1")
			t0 := time.Now()
			a.loginBeforePrepared(context.Background(), zerolog.Nop(), m, "v1-t", ps)
			took := time.Since(t0)
			if took < c.minWait || took > earlyLoginWait+time.Second {
				t.Fatalf("waited %v, want %v to %v", took, c.minWait, earlyLoginWait+time.Second)
			}
			asked := ps.spec()
			if !c.wantAsked {
				if len(asked) != 0 {
					t.Fatalf("logged in without an export: %+v", asked)
				}
				return
			}
			if len(asked) != 1 || asked[0].Volume != "v1-t" || asked[0].Portal != "[fd00::1]:3260" || asked[0].Source != "w-a" {
				t.Fatalf("early logins asked: %+v, want one to the published export for v1-t", asked)
			}
			m, _ = cp.GetMigration(context.Background(), "mig-1")
			m.State, m.TargetVol = fsm.TargetPrepared, "v1-t"
			if a.wantsEarlyLogin(m) {
				t.Fatal("after target_prepared the agent would ask for the same login again")
			}
		})
	}
}

// advancingCP moves the migration to the proposed event's state, with a
// raft index per change, as the store does.
type advancingCP struct{ *fakeCP }

func (f advancingCP) Propose(ctx context.Context, id string, ev fsm.Event, step string, p fsm.EventPayload) (*fsm.Migration, error) {
	got, err := f.fakeCP.Propose(ctx, id, ev, step, p)
	if err != nil || ev != fsm.EvTargetPrepared {
		return got, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.m.State, f.m.TargetVol = fsm.TargetPrepared, p.TargetVolume
	f.m.ModifyIndex++
	return f.m.Clone(), nil
}

// A record the watch delivered while a step ran (here export_started's,
// during the target's prepare) is older than the one the step's proposal
// made: the driver drops it instead of preparing again.
func TestDriverSkipsARecordOlderThanItsProposal(t *testing.T) {
	layout := &fsm.LUKSLayout{SectorSize: 4096, DataOffset: 16 << 20, PayloadSize: 1 << 30, Cipher: "aes-xts-plain64", KeyBytes: 64}
	cp := advancingCP{&fakeCP{m: &fsm.Migration{ID: "mig-1", Machine: "m1", Volume: "v1", Source: "w-a", Target: "w-b",
		State: fsm.Planned, Layout: layout, ModifyIndex: 1}}}
	a := newTestAgent(t, cp, "w-b")
	ctx, cancel := context.WithCancel(context.Background())
	defer func() {
		cancel()
		a.wg.Wait()
	}()
	first, _ := cp.GetMigration(ctx, "mig-1")
	a.dispatch(ctx, first)
	// The source publishes its export while the target prepares.
	time.Sleep(20 * time.Millisecond)
	cp.mu.Lock()
	cp.m.Export = &fsm.Export{Portal: "[fd00::1]:3260", IQN: "iqn.2026-12.dev.ferry:mig-1"}
	cp.m.ModifyIndex++
	published := cp.m.Clone()
	cp.mu.Unlock()
	a.dispatch(ctx, published)
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Contains(cp.events(), fsm.EvTargetPrepared) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // room for a second prepare
	n := 0
	for _, ev := range cp.events() {
		if ev == fsm.EvTargetPrepared {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("target_prepared proposed %d times (%v), want once", n, cp.events())
	}
}
