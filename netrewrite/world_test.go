package netrewrite

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/internal/testenv"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"
)

const (
	testOrg     = 0x00c0ffee
	srcHost     = 0x0a
	tgtHost     = 0x0b
	testMachine = 0x1234
	echoPort    = 7000
)

// world is the lead's model in miniature: two workers and a peer on a fabric
// bridge, every namespace uniquely named and deleted in Cleanup.
type world struct {
	t              testing.TB
	ctx            context.Context
	log            zerolog.Logger
	fab            *Fabric
	src, tgt, peer string
	prefix         string
}

func needRoot(t testing.TB) {
	t.Helper()
	testenv.Require(t, "root (CAP_NET_ADMIN, CAP_SYS_ADMIN) for network namespaces", os.Geteuid() == 0 && CheckPrivileges() == nil)
	testenv.Tools(t, "apt-get install iproute2", "ip")
}

func needNFT(t testing.TB) {
	t.Helper()
	testenv.Tools(t, "apt-get install nftables", "nft")
}

func randSuffix() string {
	b := make([]byte, 3)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func testLogger(t testing.TB) zerolog.Logger {
	if _, bench := t.(*testing.B); bench {
		return zerolog.Nop()
	}
	return zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel).With().Str("component", "netrewrite").Logger()
}

func newWorld(t testing.TB) *world {
	t.Helper()
	needRoot(t)
	p := "nrt" + randSuffix()
	w := &world{t: t, ctx: context.Background(), log: testLogger(t), prefix: p,
		src: p + "-wa", tgt: p + "-wb", peer: p + "-peer"}
	w.fab = &Fabric{
		BridgeNS: p + "-br",
		Prefix:   netip.MustParsePrefix("fd00:fe::/64"),
		Members: []FabricMember{
			{NS: w.src, HostID: srcHost, Addr: netip.MustParseAddr("fd00:fe::a")},
			{NS: w.tgt, HostID: tgtHost, Addr: netip.MustParseAddr("fd00:fe::b")},
			{NS: w.peer, Addr: netip.MustParseAddr("fd00:fe::99")},
		},
	}
	t.Cleanup(func() {
		for _, ns := range w.namespaces() {
			if err := DeleteNamespace(ns); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	if err := ConnectWorkers(w.ctx, w.log, w.fab, testOrg); err != nil {
		t.Fatal(err)
	}
	return w
}

// namespaces lists every namespace whose name starts with this world's prefix.
func (w *world) namespaces() []string {
	ents, _ := os.ReadDir(netnsDir)
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), w.prefix+"-") {
			out = append(out, e.Name())
		}
	}
	return out
}

func (w *world) machineNet(worker string, host uint32, role string) MachineNet {
	return MachineNet{WorkerNS: worker, MachineNS: w.prefix + "-m-" + role, Addr: MustBuild(testOrg, host, testMachine)}
}

// echo starts a TCP server in ns that answers every line with "name:line".
// The listener is created inside ns and served from an ordinary goroutine.
func (w *world) echo(ns, name string) (stop func()) {
	w.t.Helper()
	var ln net.Listener
	if err := RunInNS(ns, func() (err error) {
		ln, err = net.Listen("tcp6", fmt.Sprintf("[::]:%d", echoPort))
		return err
	}); err != nil {
		w.t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				s := bufio.NewScanner(c)
				for s.Scan() {
					fmt.Fprintf(c, "%s:%s\n", name, s.Text())
				}
			}()
		}
	}()
	stop = func() { ln.Close() }
	w.t.Cleanup(stop)
	return stop
}

// ask connects from the peer namespace to addr and returns the echo reply.
func (w *world) ask(addr Addr, timeout time.Duration) (string, error) {
	var reply string
	err := RunInNS(w.peer, func() error {
		c, err := net.DialTimeout("tcp6", net.JoinHostPort(addr.String(), fmt.Sprint(echoPort)), timeout)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		if _, err := fmt.Fprintln(c, "hi"); err != nil {
			return err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		reply = strings.TrimSpace(line)
		return err
	})
	return reply, err
}

func (w *world) mustReach(addr Addr, want string) {
	w.t.Helper()
	got, err := w.ask(addr, 3*time.Second)
	if err != nil {
		w.t.Fatalf("peer -> %s: %v", addr, err)
	}
	if got != want+":hi" {
		w.t.Fatalf("peer -> %s: got %q, want %q", addr, got, want+":hi")
	}
}

func (w *world) mustNotReach(addr Addr) {
	w.t.Helper()
	if got, err := w.ask(addr, 700*time.Millisecond); err == nil {
		w.t.Fatalf("peer -> %s answered %q; want no answer", addr, got)
	}
}

func (w *world) state(nss ...string) string {
	w.t.Helper()
	var b strings.Builder
	for _, ns := range nss {
		s, err := KernelState(w.ctx, ns)
		if err != nil {
			w.t.Fatal(err)
		}
		fmt.Fprintf(&b, "### %s\n%s", ns, s)
	}
	return b.String()
}

func sameState(t *testing.T, what, before, after string) {
	t.Helper()
	if before == after {
		return
	}
	// Lines only on one side first (order-insensitive), then both states.
	count := map[string]int{}
	for _, l := range strings.Split(before, "\n") {
		count[l]++
	}
	for _, l := range strings.Split(after, "\n") {
		count[l]--
	}
	var diff strings.Builder
	for l, n := range count {
		switch {
		case n > 0:
			fmt.Fprintf(&diff, "- %s\n", l)
		case n < 0:
			fmt.Fprintf(&diff, "+ %s\n", l)
		}
	}
	t.Fatalf("%s: kernel state differs:\n%s--- before\n%s\n--- after\n%s", what, diff.String(), before, after)
}

// plans returns the source and target plans of migrating the test machine.
func (w *world) plans(mode Mode) (SourcePlan, TargetPlan) {
	srcNet := w.machineNet(w.src, srcHost, "src")
	tgtNet := w.machineNet(w.tgt, tgtHost, "tgt")
	via, _ := w.fab.Member(tgtHost)
	return SourcePlan{Machine: srcNet, Via: via.Addr}, TargetPlan{Machine: tgtNet, Old: srcNet.Addr, Mode: mode}
}

func TestCutoverGraceAndExpiry(t *testing.T) {
	for _, mode := range []Mode{ModeAlias, ModeNAT} {
		t.Run(string(mode), func(t *testing.T) {
			if mode == ModeNAT {
				needNFT(t)
			}
			w := newWorld(t)
			sp, tp := w.plans(mode)
			old, new := sp.Machine.Addr, tp.Machine.Addr
			if err := SetupMachineNet(w.ctx, w.log, sp.Machine); err != nil {
				t.Fatal(err)
			}
			stopSrc := w.echo(sp.Machine.MachineNS, "source")
			w.mustReach(old, "source")
			w.mustNotReach(new)

			// Migration: the machine stops on the source, starts on the target.
			stopSrc()
			if err := CutoverTarget(w.ctx, w.log, tp); err != nil {
				t.Fatal(err)
			}
			w.echo(tp.Machine.MachineNS, "target")
			if err := CutoverSource(w.ctx, w.log, sp); err != nil {
				t.Fatal(err)
			}
			w.mustReach(new, "target")
			w.mustReach(old, "target") // grace period: hard-coded peers still work

			// The mapping is visible in both workers' kernel state.
			for _, ns := range []string{w.src, w.tgt} {
				kms, err := KernelMappings(w.ctx, ns)
				if err != nil {
					t.Fatal(err)
				}
				if len(kms) != 1 || kms[0].Old != old.IP() {
					t.Fatalf("kernel mappings in %s: %+v, want one for %s", ns, kms, old)
				}
			}

			// Applying again, or after losing part of the state, converges.
			after := w.state(w.src, w.tgt, tp.Machine.MachineNS)
			for i := 0; i < 2; i++ {
				if err := CutoverTarget(w.ctx, w.log, tp); err != nil {
					t.Fatal(err)
				}
				if err := CutoverSource(w.ctx, w.log, sp); err != nil {
					t.Fatal(err)
				}
			}
			sameState(t, "cutover applied three times", after, w.state(w.src, w.tgt, tp.Machine.MachineNS))
			if err := ExpireTarget(w.ctx, w.log, tp); err != nil { // as if half-undone by a crash
				t.Fatal(err)
			}
			if err := CutoverTarget(w.ctx, w.log, tp); err != nil {
				t.Fatal(err)
			}
			sameState(t, "cutover re-applied after partial loss", after, w.state(w.src, w.tgt, tp.Machine.MachineNS))

			// Expiry through the store, as the agent does it.
			store := Store{Dir: t.TempDir()}
			now := time.Now()
			m, err := NewMapping("m-1234", tp, &sp, now, time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			if err := store.Put(m); err != nil {
				t.Fatal(err)
			}
			if done, err := store.ExpireDue(w.ctx, w.log, now); err != nil || len(done) != 0 {
				t.Fatalf("ExpireDue before Until: %v, %v", done, err)
			}
			w.mustReach(old, "target")
			done, err := store.ExpireDue(w.ctx, w.log, now.Add(2*time.Minute))
			if err != nil || len(done) != 1 {
				t.Fatalf("ExpireDue after Until: %v, %v", done, err)
			}
			w.mustReach(new, "target")
			w.mustNotReach(old)
			if left, _ := store.List(); len(left) != 0 {
				t.Fatalf("store still lists %v", left)
			}
			for _, ns := range []string{w.src, w.tgt} {
				if kms, err := KernelMappings(w.ctx, ns); err != nil || len(kms) != 0 {
					t.Fatalf("kernel mappings in %s after expiry: %+v, %v", ns, kms, err)
				}
			}
			// Expiring again is a no-op.
			expired := w.state(w.src, w.tgt)
			if err := ExpireMapping(w.ctx, w.log, m); err != nil {
				t.Fatal(err)
			}
			sameState(t, "expire twice", expired, w.state(w.src, w.tgt))
		})
	}
}

func TestRollbackRestoresBothWorkers(t *testing.T) {
	for _, mode := range []Mode{ModeAlias, ModeNAT} {
		t.Run(string(mode), func(t *testing.T) {
			if mode == ModeNAT {
				needNFT(t)
			}
			w := newWorld(t)
			sp, tp := w.plans(mode)
			if err := SetupMachineNet(w.ctx, w.log, sp.Machine); err != nil {
				t.Fatal(err)
			}
			w.echo(sp.Machine.MachineNS, "source")
			w.mustReach(sp.Machine.Addr, "source")
			before := w.state(w.src, w.tgt, sp.Machine.MachineNS)

			// Rollback after both steps, and rollback of steps that never ran.
			if err := CutoverTarget(w.ctx, w.log, tp); err != nil {
				t.Fatal(err)
			}
			if err := CutoverSource(w.ctx, w.log, sp); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 2; i++ {
				if err := RollbackTarget(w.ctx, w.log, tp); err != nil {
					t.Fatal(err)
				}
				if err := RollbackSource(w.ctx, w.log, sp); err != nil {
					t.Fatal(err)
				}
			}
			sameState(t, "rollback", before, w.state(w.src, w.tgt, sp.Machine.MachineNS))
			if NamespaceExists(tp.Machine.MachineNS) {
				t.Fatalf("target machine namespace %s survived rollback", tp.Machine.MachineNS)
			}
			w.mustReach(sp.Machine.Addr, "source")

			// Target prepared but the source never cut over (crash in between).
			if err := CutoverTarget(w.ctx, w.log, tp); err != nil {
				t.Fatal(err)
			}
			if err := RollbackTarget(w.ctx, w.log, tp); err != nil {
				t.Fatal(err)
			}
			if err := RollbackSource(w.ctx, w.log, sp); err != nil {
				t.Fatal(err)
			}
			sameState(t, "rollback of a half cutover", before, w.state(w.src, w.tgt, sp.Machine.MachineNS))
			w.mustReach(sp.Machine.Addr, "source")
		})
	}
}

func TestMachineNetSetupTeardownIdempotent(t *testing.T) {
	w := newWorld(t)
	before := w.state(w.tgt)
	m := w.machineNet(w.tgt, tgtHost, "x")
	for i := 0; i < 2; i++ {
		if err := SetupMachineNet(w.ctx, w.log, m); err != nil {
			t.Fatal(err)
		}
	}
	up := w.state(w.tgt, m.MachineNS)
	// A machine namespace deleted behind our back (crash) is rebuilt.
	if err := DeleteNamespace(m.MachineNS); err != nil {
		t.Fatal(err)
	}
	if err := SetupMachineNet(w.ctx, w.log, m); err != nil {
		t.Fatal(err)
	}
	sameState(t, "setup after namespace loss", up, w.state(w.tgt, m.MachineNS))
	w.echo(m.MachineNS, "x")
	w.mustReach(m.Addr, "x")
	for i := 0; i < 2; i++ {
		if err := TeardownMachineNet(w.ctx, w.log, m); err != nil {
			t.Fatal(err)
		}
	}
	sameState(t, "teardown", before, w.state(w.tgt))
}

func TestPlansRejectBadInput(t *testing.T) {
	ctx := context.Background()
	log := zerolog.Nop()
	old := MustBuild(1, 2, 3)
	good := MachineNet{WorkerNS: "w", MachineNS: "m", Addr: MustBuild(1, 4, 3)}
	cases := map[string]error{
		"no address": CutoverTarget(ctx, log, TargetPlan{Machine: MachineNet{MachineNS: "m"}, Old: old}),
		"no old":     CutoverTarget(ctx, log, TargetPlan{Machine: good}),
		"same":       CutoverTarget(ctx, log, TargetPlan{Machine: good, Old: good.Addr}),
		"other org":  CutoverTarget(ctx, log, TargetPlan{Machine: good, Old: MustBuild(9, 2, 3)}),
		"bad mode":   CutoverTarget(ctx, log, TargetPlan{Machine: good, Old: old, Mode: "bogus"}),
		"no ns":      SetupMachineNet(ctx, log, MachineNet{Addr: old}),
		"slash ns":   SetupMachineNet(ctx, log, MachineNet{MachineNS: "../etc", Addr: old}),
		"long if":    SetupMachineNet(ctx, log, MachineNet{MachineNS: "m", HostVeth: "a-very-long-ifname", Addr: old}),
		"no via":     CutoverSource(ctx, log, SourcePlan{Machine: good}),
		"v4 via":     CutoverSource(ctx, log, SourcePlan{Machine: good, Via: netip.MustParseAddr("10.0.0.1")}),
		"empty map":  ExpireMapping(ctx, log, Mapping{Old: old, New: good.Addr}),
		"bad fabric": (&Fabric{BridgeNS: "b", Prefix: netip.MustParsePrefix("10.0.0.0/8")}).Connect(ctx, log),
	}
	for name, err := range cases {
		if err == nil {
			t.Errorf("%s: accepted", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	if err := (Store{Dir: t.TempDir()}).Put(Mapping{Old: old, New: old}); !errors.Is(err, ErrBadAddr) {
		t.Errorf("store accepted old == new: %v", err)
	}
}

// TestMigrateBackDuringGrace moves the machine A -> B and, while A still
// forwards A's old address to B, back B -> A. The new address on A is the
// first mapping's old address; expiring the first mapping afterwards must not
// remove the machine's route on A (ferry's routes are told apart by protocol).
func TestMigrateBackDuringGrace(t *testing.T) {
	w := newWorld(t)
	sp, tp := w.plans(ModeAlias)
	addrA, addrB := sp.Machine.Addr, tp.Machine.Addr
	if err := SetupMachineNet(w.ctx, w.log, sp.Machine); err != nil {
		t.Fatal(err)
	}
	if err := CutoverTarget(w.ctx, w.log, tp); err != nil {
		t.Fatal(err)
	}
	if err := CutoverSource(w.ctx, w.log, sp); err != nil {
		t.Fatal(err)
	}
	first, err := NewMapping("m", tp, &sp, time.Now(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	// Back to A, into a fresh machine namespace (the old one is torn down).
	if err := TeardownMachineNet(w.ctx, w.log, sp.Machine); err != nil {
		t.Fatal(err)
	}
	backNet := w.machineNet(w.src, srcHost, "back")
	via, _ := w.fab.Member(srcHost)
	back := TargetPlan{Machine: backNet, Old: addrB}
	if err := CutoverTarget(w.ctx, w.log, back); err != nil {
		t.Fatal(err)
	}
	w.echo(backNet.MachineNS, "back")
	if err := CutoverSource(w.ctx, w.log, SourcePlan{Machine: tp.Machine, Via: via.Addr}); err != nil {
		t.Fatal(err)
	}
	w.mustReach(addrA, "back")
	w.mustReach(addrB, "back")
	if err := ExpireMapping(w.ctx, w.log, first); err != nil {
		t.Fatal(err)
	}
	w.mustReach(addrA, "back") // the machine's own route on A survived
	w.mustReach(addrB, "back") // the second mapping is untouched
}

// TestExpireAfterWorkersGone: a record whose workers were torn down (demo
// cleanup, a decommissioned host) expires cleanly instead of failing forever.
func TestExpireAfterWorkersGone(t *testing.T) {
	needRoot(t)
	p := "nrt" + randSuffix()
	tp := TargetPlan{Machine: MachineNet{WorkerNS: p + "-gone-w", MachineNS: p + "-gone-m", Addr: MustBuild(1, 2, 3)}, Old: MustBuild(1, 4, 3)}
	sp := SourcePlan{Machine: MachineNet{WorkerNS: p + "-gone-s", MachineNS: p + "-gone-sm", Addr: MustBuild(1, 4, 3)}, Via: netip.MustParseAddr("fd00:fe::b")}
	m, err := NewMapping("m", tp, &sp, time.Now(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if err := ExpireMapping(context.Background(), testLogger(t), m); err != nil {
		t.Fatal(err)
	}
}

func TestFabricIdempotentAndTeardown(t *testing.T) {
	w := newWorld(t)
	before := w.state(w.src, w.tgt, w.peer)
	if err := ConnectWorkers(w.ctx, w.log, w.fab, testOrg); err != nil {
		t.Fatal(err)
	}
	sameState(t, "fabric connected twice", before, w.state(w.src, w.tgt, w.peer))
	// The bridge namespace lost (crash): Connect rebuilds the same fabric.
	if err := DeleteNamespace(w.fab.BridgeNS); err != nil {
		t.Fatal(err)
	}
	if err := ConnectWorkers(w.ctx, w.log, w.fab, testOrg); err != nil {
		t.Fatal(err)
	}
	sameState(t, "fabric rebuilt", before, w.state(w.src, w.tgt, w.peer))
	if err := w.fab.Teardown(w.ctx, w.log); err != nil {
		t.Fatal(err)
	}
	if NamespaceExists(w.fab.BridgeNS) {
		t.Fatal("bridge namespace survived Teardown")
	}
	if s := w.state(w.src); strings.Contains(s, FabricIf) {
		t.Fatalf("%s still has %s after Teardown:\n%s", w.src, FabricIf, s)
	}
}

// TestDeleteLinkAlreadyGone is the race a deleted namespace opens: the link
// was looked up, then vanished (the kernel's deferred netns cleanup took it)
// before the delete; the delete must count it as done, not fail a setup.
func TestDeleteLinkAlreadyGone(t *testing.T) {
	needRoot(t)
	ns := "nrt" + randSuffix() + "-gone"
	if err := EnsureNamespace(ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := DeleteNamespace(ns); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if err := withHandle(ns, func(h *netlink.Handle) error {
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "gone0"}, PeerName: "gone1"}); err != nil {
			return err
		}
		stale, err := h.LinkByName("gone0")
		if err != nil {
			return err
		}
		if err := h.LinkDel(stale); err != nil {
			return err
		}
		if err := h.LinkDel(stale); err == nil {
			return fmt.Errorf("a second raw LinkDel succeeded: the test no longer reproduces the race")
		}
		return deleteLink(h, stale)
	}); err != nil {
		t.Fatal(err)
	}
}
