package security

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/iscsi/exporter"
	"github.com/ferry-dev/ferry/luks"
	"github.com/ferry-dev/ferry/server/servertest"
)

// revokeEnv is a one-server cluster whose certificates also serve an
// export: source w-a exports a volume for migration mig1 to target w-c,
// and the operator revokes certificates through the real server API.
type revokeEnv struct {
	c        *servertest.Cluster
	op       *api.Client
	wa, wc   *api.Client
	img      string
	want     []byte
	log      zerolog.Logger
	stateDir string
}

func newRevokeEnv(t *testing.T) *revokeEnv {
	t.Helper()
	testenv.Root(t, "the export child runs gotgt in a private network namespace")
	c := servertest.New(t, 1, servertest.Options{})
	e := &revokeEnv{c: c, op: c.Client("operator", tlsutil.KindOperator),
		wa: c.Client("w-a", tlsutil.KindWorker), wc: c.Client("w-c", tlsutil.KindWorker),
		log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel), stateDir: t.TempDir()}
	e.want = make([]byte, 4<<20)
	rand.Read(e.want)
	e.img = filepath.Join(t.TempDir(), "volume")
	if err := os.WriteFile(e.img, e.want, 0o600); err != nil {
		t.Fatal(err)
	}
	return e
}

// source is w-a's exporter, reading the deny list as w-a.
func (e *revokeEnv) source(dir string) *exporter.Exporter {
	return &exporter.Exporter{Log: e.log, StateDir: dir, Address: "127.0.0.1", Domain: "test.ferry",
		TLSDir: e.c.TLSDir, Name: "w-a", Revoked: e.wa, DenyEvery: 200 * time.Millisecond}
}

func (e *revokeEnv) serial(t *testing.T, name string) string {
	t.Helper()
	cf, _ := tlsutil.Files(e.c.TLSDir, name)
	b, err := os.ReadFile(cf)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tlsutil.ParseCertPEM(b)
	if err != nil {
		t.Fatal(err)
	}
	return tlsutil.SerialString(cert.SerialNumber)
}

// dial logs into portal as w-c (TLS expecting w-a; tc nil: plain iSCSI).
func (e *revokeEnv) dial(portal, iqn string, tc bool) (*iscsi.LUN, error) {
	cfg := iscsi.InitiatorConfig{Portal: portal, IQN: iqn, Timeout: 3 * time.Second, Sessions: 1}
	if tc {
		c, err := tlsutil.PeerClientConfig(e.c.TLSDir, "w-c", tlsutil.Identity{Name: "w-a", Kind: tlsutil.KindWorker})
		if err != nil {
			return nil, err
		}
		cfg.TLS = c
	}
	return iscsi.Dial(context.Background(), e.log, cfg)
}

func (e *revokeEnv) readAll(t *testing.T, l *iscsi.LUN) error {
	t.Helper()
	got := make([]byte, len(e.want))
	if _, err := l.ReadAt(got, 0); err != nil {
		return err
	}
	if !bytes.Equal(got, e.want) {
		t.Fatal("the target read other bytes than the volume's")
	}
	return nil
}

// untilReadFails reads through l until it fails, or fails the test.
func (e *revokeEnv) untilReadFails(t *testing.T, l *iscsi.LUN, what string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for e.readAll(t, l) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("%s: the session still reads the export 15 s after the revocation", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Issue 13, "certificates with a lifecycle" reaching the export: once the
// operator revokes the migration target's certificate through the server
// API, the source's gate cuts the target's live session and refuses its
// next login; an export started after the revocation refuses it from the
// first handshake.
func TestRevokedTargetReadsNothingFromTheExport(t *testing.T) {
	e := newRevokeEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	exp := e.source(filepath.Join(e.stateDir, "exports"))
	go exp.WatchRevoked(ctx)
	portal, iqn, err := exp.Export(ctx, "mig1", e.img, "w-c", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = exp.Unexport(context.Background(), "mig1") })
	l, err := e.dial(portal, iqn, true)
	if err != nil {
		t.Fatalf("the target's certificate was refused before any revocation: %v", err)
	}
	defer l.Close()
	if err := e.readAll(t, l); err != nil {
		t.Fatalf("read before the revocation: %v", err)
	}

	if err := e.op.RevokeCert(ctx, e.serial(t, "w-c"), "worker host lost"); err != nil {
		t.Fatal(err)
	}
	e.untilReadFails(t, l, "revoked target's live session")
	if l2, err := e.dial(portal, iqn, true); err == nil {
		l2.Close()
		t.Fatal("the revoked target logged into the export again")
	}

	// A new export takes the list when it starts, before any refresh.
	fresh := e.source(filepath.Join(e.stateDir, "exports2"))
	portal2, iqn2, err := fresh.Export(ctx, "mig2", e.img, "w-c", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fresh.Unexport(context.Background(), "mig2") })
	if l3, err := e.dial(portal2, iqn2, true); err == nil {
		l3.Close()
		t.Fatal("an export started after the revocation admitted the revoked target")
	}

	// Without the list there is no export: a source that cannot read it
	// (here: its own certificate is revoked too) refuses to serve.
	if err := e.op.RevokeCert(ctx, e.serial(t, "w-a"), "test"); err != nil {
		t.Fatal(err)
	}
	blind := e.source(filepath.Join(e.stateDir, "exports3"))
	// Its own client, retrying briefly: the first export's watch still
	// reads e.wa's settings.
	wa := e.c.Client("w-a", tlsutil.KindWorker)
	wa.RetryFor = time.Second
	blind.Revoked = wa
	if _, _, err := blind.Export(ctx, "mig3", e.img, "w-c", "127.0.0.1"); err == nil {
		_ = blind.Unexport(context.Background(), "mig3")
		t.Fatal("an export started without knowing the revoked certificates")
	}
}

// The kernel path's tunnel on the target verifies the source: once the
// source's certificate is revoked, the tunnel cuts the session and reaches
// the export no more.
func TestTunnelRefusesARevokedSourceExport(t *testing.T) {
	e := newRevokeEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// The clone's first background batches start at once, rate cap or
	// not: 32 MiB at 1 MiB/s outlast the test unless the revocation stops it.
	img := filepath.Join(t.TempDir(), "volume")
	if err := os.WriteFile(img, e.want, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 32<<20); err != nil {
		t.Fatal(err)
	}
	src := e.source(filepath.Join(e.stateDir, "exports"))
	portal, iqn, err := src.Export(ctx, "mig1", img, "w-c", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = src.Unexport(context.Background(), "mig1") })

	// The target agent's copy of the list, refreshed as w-c.
	deny := &iscsi.DenyList{}
	target := &exporter.Exporter{Log: e.log, StateDir: filepath.Join(e.stateDir, "target-exports"), Revoked: e.wc, Deny: deny,
		DenyEvery: 200 * time.Millisecond}
	go target.WatchRevoked(ctx)
	tc, err := tlsutil.PeerClientConfig(e.c.TLSDir, "w-c", tlsutil.Identity{Name: "w-a", Kind: tlsutil.KindWorker})
	if err != nil {
		t.Fatal(err)
	}
	tun, err := iscsi.StartTunnel(e.log, "127.0.0.1:0", portal, tc, deny.Denied)
	if err != nil {
		t.Fatal(err)
	}
	defer tun.Close()
	l, err := e.dial(tun.Addr(), iqn, false)
	if err != nil {
		t.Fatalf("through the tunnel before any revocation: %v", err)
	}
	defer l.Close()
	if err := e.readAll(t, l); err != nil {
		t.Fatalf("read through the tunnel before the revocation: %v", err)
	}
	if err := e.op.RevokeCert(ctx, e.serial(t, "w-a"), "source host lost"); err != nil {
		t.Fatal(err)
	}
	e.untilReadFails(t, l, "session to a revoked source")
	if l2, err := e.dial(tun.Addr(), iqn, false); err == nil {
		l2.Close()
		t.Fatal("the tunnel reached a source whose certificate is revoked")
	}
}

// The userspace path's initiator (`ferry volume serve`) verifies the source
// too: once the operator revokes the source's certificate, the target
// agent's list (refreshed as by the agent) reaches the running clone
// (userspace.Backend.WatchDenied), which cuts its sessions; hydration stalls
// with a reason naming the revocation, and a clone started later never
// reads the source.
func TestUserspaceCloneRefusesARevokedSource(t *testing.T) {
	e := newRevokeEnv(t)
	testenv.Tools(t, "run scripts/deps.sh", "fusermount3")
	testenv.Paths(t, "modprobe fuse", "/dev/fuse")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// The clone's first background batches start at once, rate cap or
	// not: 32 MiB at 1 MiB/s outlast the test unless the revocation stops it.
	img := filepath.Join(t.TempDir(), "volume")
	if err := os.WriteFile(img, e.want, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 32<<20); err != nil {
		t.Fatal(err)
	}
	src := e.source(filepath.Join(e.stateDir, "exports"))
	portal, iqn, err := src.Export(ctx, "mig1", img, "w-c", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = src.Unexport(context.Background(), "mig1") })

	// The target agent: its deny list refreshed as w-c, and its clones.
	deny := &iscsi.DenyList{}
	const refresh, push = 200 * time.Millisecond, 100 * time.Millisecond
	target := &exporter.Exporter{Log: e.log, StateDir: filepath.Join(e.stateDir, "target-exports"), Revoked: e.wc, Deny: deny,
		DenyEvery: refresh}
	go target.WatchRevoked(ctx)
	b := &userspace.Backend{DataDir: t.TempDir(), Exe: exe, Log: e.log, Loops: loopdev.System{}, Deny: deny,
		TLS: &datapath.PeerTLS{Dir: e.c.TLSDir, Name: "w-c", Denied: deny.Denied}}
	go b.WatchDenied(ctx, push)
	// A raw clone (no LUKS2 view): the export serves plain bytes here.
	start := func(vol string) (*userspace.Process, error) {
		cfg := b.Config(vol, luks.Layout{})
		cfg.Raw = true
		cfg.Clone = &userspace.Clone{MetaPath: filepath.Join(b.VolumeDir(vol), "clone.meta"), Portal: portal, IQN: iqn,
			TLS: b.TLS, Source: "w-a", Denied: deny.Serials(), RegionSize: 4096, RateLimit: 1 << 20}
		if err := os.MkdirAll(b.VolumeDir(vol), 0o700); err != nil {
			t.Fatal(err)
		}
		return userspace.Start(ctx, e.log, exe, cfg, nil, filepath.Join(b.DataDir, "run"))
	}
	t.Cleanup(func() { _ = b.CleanupAll(context.Background()) })
	p, err := start("clone1")
	if err != nil {
		t.Fatalf("clone before any revocation: %v", err)
	}
	got := make([]byte, 64<<10)
	f, err := os.Open(p.Config().DevicePath())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, e.want[1<<20:1<<20+len(got)]) {
		t.Fatalf("read through the clone before the revocation: %v", err)
	}
	if err := p.EnableHydration(ctx); err != nil {
		t.Fatal(err)
	}

	serial := e.serial(t, "w-a")
	revoked := time.Now()
	if err := e.op.RevokeCert(ctx, serial, "source host lost"); err != nil {
		t.Fatal(err)
	}
	var st *datapath.Status
	for {
		if st, err = p.Status(ctx); err != nil {
			t.Fatal(err)
		}
		if st.Progress != nil && st.Progress.Stalled {
			break
		}
		if st.Complete {
			t.Fatal("the clone hydrated every region from a source whose certificate was revoked")
		}
		if time.Since(revoked) > 30*time.Second {
			t.Fatalf("the clone still reads its revoked source 30 s after the revocation: %+v", st.Progress)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if r := st.Progress.StalledReason; !strings.Contains(r, "revoked") || !strings.Contains(r, serial) {
		t.Fatalf("hydration stalled with %q: want the reason to name the revoked certificate %s", r, serial)
	}
	t.Logf("hydration stalled %v after the revocation was committed (list refresh %v, push %v): %s",
		time.Since(revoked), refresh, push, st.Progress.StalledReason)
	// What the machine reads and was not hydrated fails (EIO), at once.
	began := time.Now()
	if _, err := f.ReadAt(got, 30<<20); err == nil {
		t.Fatal("a read of an unhydrated block succeeded after the source was revoked")
	} else {
		t.Logf("the machine's read of an unhydrated block failed after %v: %v", time.Since(began), err)
	}
	if took := time.Since(began); took > 10*time.Second {
		t.Errorf("a read from the revoked source took %v to fail", took)
	}

	if _, err := start("clone2"); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("a clone started after the revocation: %v, want a refusal naming the revocation", err)
	}
}
