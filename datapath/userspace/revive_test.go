package userspace

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// kill -9 of a mounted volume's datapath: the backend says it is dead,
// releases the dead chain, and a new mount serves every byte that was
// fsynced before the crash.
func TestReviveAfterDatapathCrash(t *testing.T) {
	dir := t.TempDir()
	b := hostBackend(t, dir)
	t.Cleanup(func() { b.CleanupAll(context.Background()) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const vol = "rv1"
	pass := []byte("revive-passphrase")
	layout, err := b.Create(ctx, vol, 32<<20, pass)
	if err != nil {
		t.Fatal(err)
	}
	mnt := b.MountPoint("m")
	if _, err := b.MountLocal(ctx, vol, layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	if b.DatapathDead(ctx, vol) {
		t.Fatal("a live datapath reported dead")
	}
	data := bytes.Repeat([]byte("acknowledged "), 20000)
	f, err := os.Create(filepath.Join(mnt, "records"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil { // the acknowledgement
		t.Fatal(err)
	}
	f.Close()

	killProcesses(filepath.Join(b.runDir(), vol+".json"))
	if !b.DatapathDead(ctx, vol) {
		t.Fatal("a killed datapath not reported dead")
	}
	if err := b.ReleaseDead(ctx, vol, mnt); err != nil {
		t.Fatalf("ReleaseDead: %v", err)
	}
	if _, err := b.MountLocal(ctx, vol, layout, pass, mnt); err != nil {
		t.Fatalf("mount after the crash: %v", err)
	}
	got, err := os.ReadFile(filepath.Join(mnt, "records"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("after the datapath crash: read %d bytes (%v), want the %d fsynced", len(got), err, len(data))
	}
	if b.DatapathDead(ctx, vol) {
		t.Fatal("the revived datapath reported dead")
	}
	if err := b.Unmount(ctx, vol, mnt); err != nil {
		t.Fatal(err)
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
