package userspace

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
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

// A prestarted clone's datapath asked to log in to the source's export
// before its configuration is final (PreConnect) keeps that session when
// the clone names the same export: the same process serves the clone, its
// build says it adopted the early login, and the volume reads back. Asked
// to log in somewhere else (another IQN), the clone logs in again itself.
func TestPrestartedCloneLogsInEarly(t *testing.T) {
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
	newBackend := func(name string) *Backend {
		deny := &iscsi.DenyList{}
		b := &Backend{DataDir: t.TempDir(), Exe: exe, Log: log, Loops: loopdev.System{}, FastKDF: true,
			TLS: &datapath.PeerTLS{Dir: tlsDir, Name: name, Denied: deny.Denied}, Deny: deny}
		t.Cleanup(func() { b.CleanupAll(context.Background()) })
		return b
	}
	src := newBackend("w-a")
	const vol = "el1"
	pass := []byte("early-login-passphrase")
	layout, err := src.Create(ctx, vol, 32<<20, pass)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("read through a session opened early "), 20000)
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
		Allow: []string{"127.0.0.1/32"}, IQN: iscsi.MigrationIQN("dev.ferry.test", "el", time.Now()),
		StateDir: filepath.Join(t.TempDir(), "export"), LogLevel: "warn", TLS: gt})
	if err != nil {
		t.Fatalf("export the source volume: %v", err)
	}
	t.Cleanup(func() { _ = exp.Stop() })

	for _, c := range []struct {
		name      string
		earlyIQN  string
		wantEarly bool
	}{
		{"same export", exp.IQN(), true},
		{"another export", exp.IQN() + "-other", false},
	} {
		dst := newBackend("w-c")
		spec := datapath.CloneSpec{Volume: "el1-t", Layout: layout, Portal: exp.Portal(), IQN: exp.IQN(), Source: "w-a"}
		f, err := blockdev.CreateSparse(dst.DataPath(spec.Volume), layout.DeviceSize())
		if err != nil {
			if err = os.MkdirAll(dst.VolumeDir(spec.Volume), 0o700); err == nil {
				f, err = blockdev.CreateSparse(dst.DataPath(spec.Volume), layout.DeviceSize())
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		f.Close()
		cfgPath := filepath.Join(dst.runDir(), spec.Volume+".json")
		dst.Prestart(ctx, spec.Volume)
		// Started, but maybe not yet exec'd: its command line comes then.
		pre := processesNaming(cfgPath)
		for deadline := time.Now().Add(10 * time.Second); len(pre) == 0 && time.Now().Before(deadline); pre = processesNaming(cfgPath) {
			time.Sleep(10 * time.Millisecond)
		}
		if len(pre) != 1 {
			t.Fatalf("%s: prestarted processes %v, want one", c.name, pre)
		}
		early := spec
		early.IQN = c.earlyIQN
		dst.PreConnect(ctx, early)
		dst.PreConnect(ctx, early) // idempotent: one connect line
		tmnt := dst.MountPoint("m")
		if _, err := dst.MountClone(ctx, spec, pass, tmnt); err != nil {
			t.Fatalf("%s: clone: %v", c.name, err)
		}
		if got := processesNaming(cfgPath); !slices.Equal(got, pre) {
			t.Fatalf("%s: the clone is served by %v, want the prestarted %v", c.name, got, pre)
		}
		if got, err := os.ReadFile(filepath.Join(tmnt, "data")); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%s: read through the clone: %v", c.name, err)
		}
		logged, err := os.ReadFile(filepath.Join(dst.runDir(), spec.Volume+".log"))
		if err != nil {
			t.Fatal(err)
		}
		want := `"early_login":` + map[bool]string{true: "true", false: "false"}[c.wantEarly]
		if !strings.Contains(string(logged), want) {
			t.Fatalf("%s: the datapath's build does not say %s:\n%s", c.name, want, logged)
		}
		if err := dst.Unmount(ctx, spec.Volume, tmnt); err != nil {
			t.Fatal(err)
		}
	}
}
