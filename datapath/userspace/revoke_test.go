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

	"github.com/ferry-dev/ferry/datapath"
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
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// Source w-a: a volume with a file, exported to w-c over TLS.
	x := newTLSExport(t, ctx, "rk1", "rk", []byte("revoke-passphrase"), bytes.Repeat([]byte("only the source worker serves this "), 30000))
	newBackend, tlsDir, pass, data := x.backend, x.tlsDir, x.pass, x.data
	// Hydration capped at 1 MiB/s: the 32 MiB copy outlasts the test's
	// wait, so only the revocation can stall it.
	spec := x.spec("rk1-t")
	spec.RateLimit = 1 << 20
	prepare := func(b *Backend) { x.prepare(b, spec.Volume) }

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
