package userspace

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// lockedBuffer is a log sink tests read while the backend writes.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// A volume served after Prewarm is served by the spare (its process, its
// output moved to the volume's log); ReleaseSpare ends an unused spare; a
// spare that died is not handed anything and the volume is served anyway.
func TestPrewarmedSpareServesTheNextVolume(t *testing.T) {
	err := hostReady()
	testenv.Require(t, "host ready: "+errString(err), err == nil)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	b := &Backend{DataDir: t.TempDir(), Exe: exe, Log: zerolog.New(logs), Loops: loopdev.System{}, FastKDF: true}
	t.Cleanup(func() { b.ReleaseSpare(); b.CleanupAll(context.Background()) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pass := []byte("spare-passphrase")

	layout, err := b.Create(ctx, "sv1", 32<<20, pass)
	if err != nil {
		t.Fatal(err)
	}
	b.Prewarm()
	sp := b.spare.s
	if sp == nil {
		t.Fatal("Prewarm started no spare")
	}
	b.Prewarm() // one is enough
	if b.spare.s != sp {
		t.Fatal("a second Prewarm replaced a live spare")
	}
	before := len(logs.String())
	if _, err := b.MountLocal(ctx, "sv1", layout, pass, b.MountPoint("m1")); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String()[before:], `"spare":true`) {
		t.Fatalf("the volume was not served by the spare:\n%s", logs.String())
	}
	if b.spare.s != nil {
		t.Fatal("the spare is still offered after it was handed a volume")
	}
	if err := syscall.Kill(sp.cmd.Process.Pid, 0); err != nil {
		t.Fatalf("the spare serving sv1 is gone: %v", err)
	}
	volLog, _ := os.ReadFile(filepath.Join(b.runDir(), "sv1.log"))
	if !bytes.Contains(volLog, []byte(`"volume":"sv1"`)) {
		t.Fatalf("the spare's output did not move to the volume's log:\n%s", volLog)
	}
	if err := os.WriteFile(filepath.Join(b.MountPoint("m1"), "f"), []byte("served by a spare"), 0o600); err != nil {
		t.Fatal(err)
	}

	// An unused spare ends when released.
	b.Prewarm()
	unused := b.spare.s
	b.ReleaseSpare()
	select {
	case <-unused.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("a released spare did not exit")
	}

	// The volume's datapath, a handed spare, is found by what it serves
	// (an abandoned clone's unmount relies on killing it).
	if err := syscall.Kill(sp.cmd.Process.Pid, 0); err != nil {
		t.Fatalf("the spare serving sv1 is gone early: %v", err)
	}
	killDatapath(b.runDir(), "sv1")
	select {
	case <-sp.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("killDatapath did not end the spare serving sv1")
	}
	// An idle spare of the data dir is found too.
	b.Prewarm()
	idle := b.spare.s
	killIdleSpares(b.runDir())
	select {
	case <-idle.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("killIdleSpares left an idle spare")
	}

	// A dead spare: the next volume gets a process of its own.
	b.Prewarm()
	dead := b.spare.s
	_ = dead.cmd.Process.Kill()
	<-dead.exited
	layout2, err := b.Create(ctx, "sv2", 32<<20, pass)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.MountLocal(ctx, "sv2", layout2, pass, b.MountPoint("m2")); err != nil {
		t.Fatalf("mount after the spare died: %v", err)
	}
}

func TestSpareConfigPathRefusesOthers(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "vol-1.json")
	if got, err := spareConfigPath(dir, good); err != nil || got != good {
		t.Fatalf("spareConfigPath(%q) = %q, %v", good, got, err)
	}
	for _, bad := range []string{
		"vol-1.json",                                 // relative
		filepath.Join(dir, "..", "vol-1.json"),       // outside
		filepath.Join(dir, "sub", "vol-1.json"),      // below
		filepath.Join(dir, "vol-1.log"),              // not a configuration
		filepath.Join(dir, ".json"),                  // no volume name
		dir + "/a/../vol-1.json",                     // not clean
		filepath.Join("/etc", "passwd.json"),         // elsewhere
		filepath.Join(dir, "vol 1.json"),             // not a volume name
		filepath.Join(dir, strings.Repeat("v", 300)), // too long, no suffix
	} {
		if _, err := spareConfigPath(dir, bad); err == nil {
			t.Errorf("spareConfigPath accepted %q", bad)
		}
	}
}

// A spare whose stdin closes before it is handed anything exits cleanly.
func TestServeSpareEndsOnEOF(t *testing.T) {
	if err := ServeSpare(context.Background(), zerolog.Nop(), t.TempDir(), strings.NewReader("")); err != nil {
		t.Fatalf("ServeSpare on an empty stdin: %v", err)
	}
	if err := ServeSpare(context.Background(), zerolog.Nop(), t.TempDir(), strings.NewReader("/etc/passwd\n")); err == nil {
		t.Fatal("ServeSpare served a path outside its directory")
	}
}

// A clone's FUSE file is mounted while the clone opens; when the clone
// then fails (no source, a wrong key), the mount goes with it.
func TestEarlyMountGoesWithAFailedClone(t *testing.T) {
	err := hostReady()
	testenv.Require(t, "host ready: "+errString(err), err == nil)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b := &Backend{DataDir: t.TempDir(), Exe: exe, Log: zerolog.Nop(), Loops: loopdev.System{}, FastKDF: true}
	t.Cleanup(func() { b.CleanupAll(context.Background()) })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pass := []byte("early-mount-passphrase")
	layout, err := b.Create(ctx, "src", 32<<20, pass)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		clone Clone
		pass  []byte
	}{
		{"no source", Clone{Portal: "127.0.0.1:1", IQN: "iqn.2026-12.dev.ferry:none"}, pass},
		{"wrong key", Clone{SourcePath: b.DataPath("src")}, []byte("not the passphrase")},
	} {
		cfg := b.Config("dst", layout)
		cl := tc.clone
		cl.MetaPath, cl.RegionSize = filepath.Join(t.TempDir(), "clone.meta"), 4096
		cfg.Clone = &cl
		if err := Serve(ctx, zerolog.Nop(), cfg, tc.pass, nil); err == nil {
			t.Fatalf("%s: the clone was served", tc.name)
		}
		mounts, _ := os.ReadFile("/proc/self/mounts")
		if strings.Contains(string(mounts), cfg.MountDir) {
			t.Fatalf("%s: the FUSE file is still mounted at %s after the clone failed", tc.name, cfg.MountDir)
		}
	}
}
