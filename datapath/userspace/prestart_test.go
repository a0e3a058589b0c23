package userspace

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// waitGone waits until no process names marker.
func waitGone(t *testing.T, marker string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for len(processesNaming(marker)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("processes %v naming %s still run after %v", processesNaming(marker), marker, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A datapath prestarted before its configuration exists serves the volume
// once it is attached (the same process: no new one starts), and ends with it.
func TestPrestartedDatapathServesTheVolume(t *testing.T) {
	dir := t.TempDir()
	b := hostBackend(t, dir)
	t.Cleanup(func() { b.CleanupAll(context.Background()) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const vol = "pre1"
	pass := []byte("prestart-passphrase")
	layout, err := b.Create(ctx, vol, 32<<20, pass)
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(b.runDir(), vol+".json")
	waitGone(t, cfgPath, 10*time.Second)

	b.Prestart(ctx, vol)
	pre := processesNaming(cfgPath)
	for deadline := time.Now().Add(10 * time.Second); len(pre) == 0 && time.Now().Before(deadline); pre = processesNaming(cfgPath) {
		time.Sleep(10 * time.Millisecond)
	}
	if len(pre) != 1 {
		logged, _ := os.ReadFile(filepath.Join(b.runDir(), vol+".log"))
		t.Fatalf("prestart: processes naming %s: %v, want one; its log:\n%s", cfgPath, pre, logged)
	}
	b.Prestart(ctx, vol) // idempotent: still one
	if got := processesNaming(cfgPath); !slices.Equal(got, pre) {
		t.Fatalf("a second prestart: processes %v, want %v", got, pre)
	}

	mnt := b.MountPoint("m")
	if _, err := b.MountLocal(ctx, vol, layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	if got := processesNaming(cfgPath); !slices.Equal(got, pre) {
		t.Fatalf("serving: processes %v, want the prestarted %v", got, pre)
	}
	data := bytes.Repeat([]byte("prestarted "), 10000)
	if err := os.WriteFile(filepath.Join(mnt, "f"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := b.Unmount(ctx, vol, mnt); err != nil {
		t.Fatal(err)
	}
	waitGone(t, cfgPath, 10*time.Second)
	if _, err := b.MountLocal(ctx, vol, layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(mnt, "f"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back %d bytes (%v), want %d", len(got), err, len(data))
	}
	if err := b.Unmount(ctx, vol, mnt); err != nil {
		t.Fatal(err)
	}
}

// A prestarted datapath never handed its configuration ends when its
// volume is removed, when the backend releases it, and when something
// kills the volume's datapath by its configuration's name.
func TestPrestartedDatapathReleased(t *testing.T) {
	dir := t.TempDir()
	b := hostBackend(t, dir)
	t.Cleanup(func() { b.CleanupAll(context.Background()) })
	ctx := context.Background()
	for _, c := range []struct {
		name    string
		release func(vol string)
	}{
		{"remove", func(vol string) {
			if err := b.Remove(ctx, vol); err != nil {
				t.Fatal(err)
			}
		}},
		{"release", func(string) { b.ReleasePrestarted() }},
		{"kill", func(vol string) { killProcesses(filepath.Join(b.runDir(), vol+".json")) }},
	} {
		vol := "pre-" + c.name
		cfgPath := filepath.Join(b.runDir(), vol+".json")
		b.Prestart(ctx, vol)
		if n := len(processesNaming(cfgPath)); n != 1 {
			t.Fatalf("%s: %d processes after prestart, want 1", c.name, n)
		}
		c.release(vol)
		waitGone(t, cfgPath, 10*time.Second)
	}
	// A name that would escape the state dir starts nothing.
	b.Prestart(ctx, "../x")
	if n := len(processesNaming(filepath.Join(b.runDir(), "../x.json"))); n != 0 {
		t.Fatalf("prestart of a bad name started %d processes", n)
	}
}

// The wait for the configuration is bounded and ends quietly on end of
// input; after the line, the configuration is read (a missing one fails).
func TestServeAwaitingConfig(t *testing.T) {
	ctx := context.Background()
	missing := filepath.Join(t.TempDir(), "missing.json")
	r, w := io.Pipe()
	start := time.Now()
	if err := ServeAwaitingConfig(ctx, zerolog.Nop(), missing, r, nil, 50*time.Millisecond); err != nil {
		t.Fatalf("no line within the patience: %v, want a quiet exit", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("waited %v", d)
	}
	w.Close()
	if err := ServeAwaitingConfig(ctx, zerolog.Nop(), missing, strings.NewReader(""), nil, time.Minute); err != nil {
		t.Fatalf("end of input: %v, want a quiet exit", err)
	}
	err := ServeAwaitingConfig(ctx, zerolog.Nop(), missing, strings.NewReader("\nkey"), nil, time.Minute)
	if err == nil || !strings.Contains(err.Error(), "missing.json") {
		t.Fatalf("after the line, a missing configuration: %v", err)
	}
	// A connect line that cannot log in is reported ended at once: the
	// agent waiting on the status pipe goes on.
	sr, sw := io.Pipe()
	go func() {
		_ = ServeAwaitingConfig(ctx, zerolog.Nop(), missing, strings.NewReader(connectLine+"{not json\n"), sw, time.Minute)
	}()
	got := make(chan string, 1)
	go func() {
		b := make([]byte, len(loggedInLine))
		_, err := io.ReadFull(sr, b)
		got <- string(b) + fmt.Sprint(err)
	}()
	select {
	case g := <-got:
		if g != loggedInLine+"<nil>" {
			t.Fatalf("status pipe says %q, want %q", g, loggedInLine)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a failed early login was never reported on the status pipe")
	}
	// Said once, the pipe is closed: the agent's reader ends.
	if n, err := sr.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after the status line: %d bytes, %v; want the pipe closed", n, err)
	}
	// Never asked to log in, the pipe closes when the configuration comes.
	sr, sw = io.Pipe()
	go func() {
		_ = ServeAwaitingConfig(ctx, zerolog.Nop(), missing, strings.NewReader("\nkey"), sw, time.Minute)
	}()
	if n, err := sr.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("served without an early login: the status pipe gave %d bytes, %v; want it closed", n, err)
	}
}
