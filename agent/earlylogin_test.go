package agent

import (
	"context"
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
					// export_started, as the store commits it and the watch delivers it.
					cp.mu.Lock()
					cp.m.Export = &fsm.Export{Portal: "[fd00::1]:3260", IQN: "iqn.2026-12.dev.ferry:mig-1"}
					cp.m.ModifyIndex++
					m := cp.m.Clone()
					cp.mu.Unlock()
					a.watched.put([]*fsm.Migration{m})
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
