package userspace

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/iscsi"
)

// Issue 13, revocation reaching the userspace data path: a clone reads its
// source through `ferry volume serve` over mutual TLS. Once the source
// worker's certificate is on the target agent's deny list, WatchDenied
// sends the list to the running clone, which cuts its sessions; its
// reconnects are refused at the handshake, so hydration stalls with a
// reason naming the revocation. A clone started after the revocation
// refuses the source from its first handshake.
func TestCloneRefusesARevokedSource(t *testing.T) {
	err := hostReady()
	testenv.Require(t, "host ready: "+errString(err), err == nil)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
	tlsDir := filepath.Join(t.TempDir(), "tls")
	if err := tlsutil.EnsureDev(tlsDir, tlsutil.Cert{Name: "w-a", Kind: tlsutil.KindWorker, Hosts: []string{"127.0.0.1"}},
		tlsutil.Cert{Name: "w-c", Kind: tlsutil.KindWorker, Hosts: []string{"127.0.0.1"}}); err != nil {
		t.Fatal(err)
	}
	newBackend := func(name string, deny *iscsi.DenyList) *Backend {
		b := &Backend{DataDir: t.TempDir(), Exe: exe, Log: log, Loops: loopdev.System{}, FastKDF: true}
		if deny != nil {
			b.TLS, b.Deny = &datapath.PeerTLS{Dir: tlsDir, Name: name, Denied: deny.Denied}, deny
		}
		t.Cleanup(func() { b.CleanupAll(context.Background()) })
		return b
	}

	// Source w-a: a volume with a file, exported to w-c over TLS.
	src := newBackend("w-a", nil)
	const vol = "rk1"
	pass := []byte("revoke-passphrase")
	layout, err := src.Create(ctx, vol, 32<<20, pass)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("only the source worker serves this "), 30000)
	mnt := src.MountPoint("m")
	if _, err := src.MountLocal(ctx, vol, layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "data"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := src.Unmount(ctx, vol, mnt); err != nil {
		t.Fatal(err)
	}
	gt, err := iscsi.GateTLSFromDir(tlsDir, "w-a", "w-c")
	if err != nil {
		t.Fatal(err)
	}
	exp, err := iscsi.StartExport(ctx, log, iscsi.ExportConfig{Path: src.DataPath(vol), Listen: "127.0.0.1:0",
		Allow: []string{"127.0.0.1/32"}, IQN: iscsi.MigrationIQN("dev.ferry.test", "rk", time.Now()),
		StateDir: filepath.Join(t.TempDir(), "export"), LogLevel: "warn", TLS: gt})
	if err != nil {
		t.Fatalf("export the source volume: %v", err)
	}
	t.Cleanup(func() { _ = exp.Stop() })
	// Hydration capped at 1 MiB/s: the 32 MiB copy outlasts the test's
	// wait, so only the revocation can stall it.
	spec := datapath.CloneSpec{Volume: "rk1-t", Layout: layout, Portal: exp.Portal(), IQN: exp.IQN(), Source: "w-a", RateLimit: 1 << 20}
	prepare := func(b *Backend) {
		if err := os.MkdirAll(b.VolumeDir(spec.Volume), 0o700); err != nil {
			t.Fatal(err)
		}
		f, err := blockdev.CreateSparse(b.DataPath(spec.Volume), layout.DeviceSize())
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}

	// Target w-c: the clone reads the source before any revocation.
	deny := &iscsi.DenyList{}
	dst := newBackend("w-c", deny)
	prepare(dst)
	tmnt := dst.MountPoint("m")
	if _, err := dst.MountClone(ctx, spec, pass, tmnt); err != nil {
		t.Fatalf("clone before any revocation: %v", err)
	}
	if got, err := os.ReadFile(filepath.Join(tmnt, "data")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read through the clone before the revocation: %v", err)
	}
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	const every = 100 * time.Millisecond
	go dst.WatchDenied(wctx, every)
	h, err := dst.Clone(ctx, spec.Volume)
	if err != nil {
		t.Fatal(err)
	}

	serial := serialOf(t, tlsDir, "w-a")
	revoked := time.Now()
	if _, err := deny.Set([]string{serial}); err != nil {
		t.Fatal(err)
	}
	if err := h.EnableHydration(ctx); err != nil {
		t.Fatal(err)
	}
	var st *datapath.Status
	for {
		if st, err = h.Status(ctx); err != nil {
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
	took := time.Since(revoked)
	if r := st.Progress.StalledReason; !strings.Contains(r, "revoked") || !strings.Contains(r, serial) {
		t.Fatalf("hydration stalled with %q: want the reason to name the revoked certificate %s", r, serial)
	}
	t.Logf("hydration stalled %v after the revocation reached the agent's list (push period %v): %s", took, every, st.Progress.StalledReason)
	if took > 10*time.Second {
		t.Errorf("the revocation took %v to stop the clone's reads", took)
	}
	// The control socket takes canonical serials only.
	p, err := dst.Process(ctx, spec.Volume)
	if err != nil {
		t.Fatal(err)
	}
	var ce *CallError
	if err := p.SetDenied(ctx, []string{serial, "0x" + serial}); !errors.As(err, &ce) || ce.Status != 400 {
		t.Fatalf("a deny list with a malformed serial: %v, want a 400 refusal", err)
	}
	logb, _ := os.ReadFile(filepath.Join(dst.runDir(), spec.Volume+".log"))
	if !bytes.Contains(logb, []byte("initiator cut a session")) {
		t.Errorf("the datapath's log does not say it cut the revoked source's session:\n%s", logb)
	}

	// A clone started once the source is revoked never reads it.
	late := newBackend("w-c", deny)
	prepare(late)
	_, err = late.MountClone(ctx, spec, pass, late.MountPoint("m"))
	if err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("a clone started after the revocation: %v, want a refusal naming the revocation", err)
	}
}

func serialOf(t *testing.T, dir, name string) string {
	t.Helper()
	cf, _ := tlsutil.Files(dir, name)
	b, err := os.ReadFile(cf)
	if err != nil {
		t.Fatal(err)
	}
	c, err := tlsutil.ParseCertPEM(b)
	if err != nil {
		t.Fatal(err)
	}
	return tlsutil.SerialString(c.SerialNumber)
}
