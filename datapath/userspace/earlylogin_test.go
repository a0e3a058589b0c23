package userspace

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/iscsi"
)

// A prestarted clone's datapath asked to log in to the source's export
// before its configuration is final (PreConnect) keeps that session when
// the clone names the same export: the same process serves the clone, its
// build says it adopted the early login, and the volume reads back. Asked
// to log in somewhere else (another IQN), the clone logs in again itself.
func TestPrestartedCloneLogsInEarly(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	x := newTLSExport(t, ctx, "el1", "el", []byte("early-login-passphrase"), bytes.Repeat([]byte("read through a session opened early "), 20000))
	for _, c := range []struct {
		name      string
		earlyIQN  string
		wantEarly bool
	}{
		{"same export", x.exp.IQN(), true},
		{"another export", x.exp.IQN() + "-other", false},
	} {
		dst := x.backend("w-c", &iscsi.DenyList{})
		spec := x.spec("el1-t")
		x.prepare(dst, spec.Volume)
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
		loggedIn := dst.PreConnect(ctx, early)
		if again := dst.PreConnect(ctx, early); again != loggedIn { // idempotent: one connect line
			t.Fatalf("%s: a second PreConnect waits on another login", c.name)
		}
		// The process says when its login ended (up, or refused by the
		// other IQN), after it logged what it did.
		select {
		case <-loggedIn:
		case <-time.After(time.Minute):
			t.Fatalf("%s: the prestarted datapath never reported its early login's end", c.name)
		}
		if logged, _ := os.ReadFile(filepath.Join(dst.runDir(), spec.Volume+".log")); c.wantEarly && !strings.Contains(string(logged), "before its export was final") {
			t.Fatalf("%s: login reported ended before it was logged:\n%s", c.name, logged)
		}
		tmnt := dst.MountPoint("m")
		if _, err := dst.MountClone(ctx, spec, x.pass, tmnt); err != nil {
			t.Fatalf("%s: clone: %v", c.name, err)
		}
		if got := processesNaming(cfgPath); !slices.Equal(got, pre) {
			t.Fatalf("%s: the clone is served by %v, want the prestarted %v", c.name, got, pre)
		}
		// Once mounted, the clone reads the volume's one file ahead.
		if n := readAhead(t, filepath.Join(dst.runDir(), spec.Volume+".log"), "recent files"); n < int64(len("read through a session opened early ")*20000) {
			t.Fatalf("%s: %d bytes of recent files read ahead, want the whole data file", c.name, n)
		}
		x.readsBack(c.name, tmnt)
		logged, err := os.ReadFile(filepath.Join(dst.runDir(), spec.Volume+".log"))
		if err != nil {
			t.Fatal(err)
		}
		// Adopted, the session also brought the header read at its login:
		// the view opened from it, reading no header in the build.
		for _, want := range []string{`"early_login":`, `"header_image":`} {
			want += map[bool]string{true: "true", false: "false"}[c.wantEarly]
			if !strings.Contains(string(logged), want) {
				t.Fatalf("%s: the datapath's build does not say %s:\n%s", c.name, want, logged)
			}
		}
		// Either way the engine's memory was made while the process
		// waited, and the destination prepare made holds nothing to
		// discard.
		for _, want := range []string{`"preallocated":true`, `"dest_zeroed":true`} {
			if !strings.Contains(string(logged), want) {
				t.Fatalf("%s: the clone's open does not say %s:\n%s", c.name, want, logged)
			}
		}
		if err := dst.Unmount(ctx, spec.Volume, tmnt); err != nil {
			t.Fatal(err)
		}
	}
}

// The header kept from an early login is only a head start: when the
// source's header changed after it (here its passphrase), the key does not
// open it, and the clone reads the header again through the clone and
// opens with the header the source serves now.
func TestEarlyHeaderImageFallsBackToTheServedHeader(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	x := newTLSExport(t, ctx, "el2", "el2", []byte("the passphrase at the early login"), bytes.Repeat([]byte("the header changed after the login "), 20000))
	dst := x.backend("w-c", &iscsi.DenyList{})
	spec := x.spec("el2-t")
	x.prepare(dst, spec.Volume)
	dst.Prestart(ctx, spec.Volume)
	dst.PreConnect(ctx, spec)
	logPath := filepath.Join(dst.runDir(), spec.Volume+".log")
	kept := `"header_image":true`
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		logged, _ := os.ReadFile(logPath)
		if strings.Contains(string(logged), "before its export was final") && strings.Contains(string(logged), kept) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the early login did not keep the header:\n%s", logged)
		}
	}
	dir := t.TempDir()
	oldKey, newKey := filepath.Join(dir, "old"), filepath.Join(dir, "new")
	newPass := []byte("the passphrase after the early login")
	if err := os.WriteFile(oldKey, x.pass, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(newKey, newPass, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cryptsetup", "luksChangeKey", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--key-file", oldKey, x.srcPath, newKey).CombinedOutput(); err != nil {
		t.Fatalf("cryptsetup luksChangeKey: %v\n%s", err, out)
	}
	tmnt := dst.MountPoint("m")
	if _, err := dst.MountClone(ctx, spec, newPass, tmnt); err != nil {
		t.Fatalf("clone with the source's new passphrase: %v", err)
	}
	x.readsBack("after the header changed", tmnt)
	logged, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"early_login":true`, `"header_image":false`, "reading it again through the clone"} {
		if !strings.Contains(string(logged), want) {
			t.Fatalf("the datapath's log does not say %s:\n%s", want, logged)
		}
	}
	if err := dst.Unmount(ctx, spec.Volume, tmnt); err != nil {
		t.Fatal(err)
	}
}

// readAhead waits for the datapath logging at logPath the end of the
// read-ahead named what, and returns how many bytes it read.
func readAhead(t *testing.T, logPath, what string) int64 {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		logged, _ := os.ReadFile(logPath)
		for _, line := range strings.Split(string(logged), "\n") {
			var l struct {
				Message, What string
				Bytes         int64
			}
			if json.Unmarshal([]byte(line), &l) == nil && l.Message == "read ahead through the clone" && l.What == what {
				return l.Bytes
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no read-ahead of %s logged:\n%s", what, logged)
		}
	}
}
