package userspace

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/luks"
)

// tlsExport is a source worker w-a's volume holding one file, data,
// exported over mutual TLS to worker w-c, as a migration's source serves it.
type tlsExport struct {
	t       *testing.T
	exe     string
	log     zerolog.Logger
	tlsDir  string
	layout  luks.Layout
	pass    []byte
	data    []byte
	srcPath string // the source volume's file
	exp     *iscsi.Export
}

// newTLSExport makes volume vol (32 MiB) on w-a with data in a file named
// "data" and exports it to w-c; tag names the export's IQN.
func newTLSExport(t *testing.T, ctx context.Context, vol, tag string, pass, data []byte) *tlsExport {
	err := hostReady()
	testenv.Require(t, "host ready: "+errString(err), err == nil)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	x := &tlsExport{t: t, exe: exe, log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
		tlsDir: filepath.Join(t.TempDir(), "tls"), pass: pass, data: data}
	if err := tlsutil.EnsureDev(x.tlsDir, tlsutil.Cert{Name: "w-a", Kind: tlsutil.KindWorker, Hosts: []string{"127.0.0.1"}},
		tlsutil.Cert{Name: "w-c", Kind: tlsutil.KindWorker, Hosts: []string{"127.0.0.1"}}); err != nil {
		t.Fatal(err)
	}
	src := x.backend("w-a", nil)
	if x.layout, err = src.Create(ctx, vol, 32<<20, pass); err != nil {
		t.Fatal(err)
	}
	mnt := src.MountPoint("m")
	if _, err := src.MountLocal(ctx, vol, x.layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "data"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := src.Unmount(ctx, vol, mnt); err != nil {
		t.Fatal(err)
	}
	gt, err := iscsi.GateTLSFromDir(x.tlsDir, "w-a", "w-c")
	if err != nil {
		t.Fatal(err)
	}
	x.srcPath = src.DataPath(vol)
	x.exp, err = iscsi.StartExport(ctx, x.log, iscsi.ExportConfig{Path: x.srcPath, Listen: "127.0.0.1:0",
		Allow: []string{"127.0.0.1/32"}, IQN: iscsi.MigrationIQN("dev.ferry.test", tag, time.Now()),
		StateDir: filepath.Join(t.TempDir(), "export"), LogLevel: "warn", TLS: gt})
	if err != nil {
		t.Fatalf("export the source volume: %v", err)
	}
	t.Cleanup(func() { _ = x.exp.Stop() })
	return x
}

// backend is worker name's userspace backend; with deny, it reaches
// exports over TLS and refuses the certificates deny lists.
func (x *tlsExport) backend(name string, deny *iscsi.DenyList) *Backend {
	b := &Backend{DataDir: x.t.TempDir(), Exe: x.exe, Log: x.log, Loops: loopdev.System{}, FastKDF: true}
	if deny != nil {
		b.TLS, b.Deny = &datapath.PeerTLS{Dir: x.tlsDir, Name: name, Denied: deny.Denied}, deny
	}
	x.t.Cleanup(func() { b.CleanupAll(context.Background()) })
	return b
}

// spec is the clone of the export as volume vol.
func (x *tlsExport) spec(vol string) datapath.CloneSpec {
	return datapath.CloneSpec{Volume: vol, Layout: x.layout, Portal: x.exp.Portal(), IQN: x.exp.IQN(), Source: "w-a"}
}

// prepare creates vol's sparse destination on b, as a target's prepare step does.
func (x *tlsExport) prepare(b *Backend, vol string) {
	if err := os.MkdirAll(b.VolumeDir(vol), 0o700); err != nil {
		x.t.Fatal(err)
	}
	f, err := blockdev.CreateSparse(b.DataPath(vol), x.layout.DeviceSize())
	if err != nil {
		x.t.Fatal(err)
	}
	f.Close()
}

// readsBack fails the test unless the clone mounted at mnt holds data.
func (x *tlsExport) readsBack(what, mnt string) {
	x.t.Helper()
	if got, err := os.ReadFile(filepath.Join(mnt, "data")); err != nil || !bytes.Equal(got, x.data) {
		x.t.Fatalf("%s: read through the clone: %v", what, err)
	}
}
