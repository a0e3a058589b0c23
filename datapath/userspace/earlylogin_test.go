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
		dst.PreConnect(ctx, early)
		dst.PreConnect(ctx, early) // idempotent: one connect line
		tmnt := dst.MountPoint("m")
		if _, err := dst.MountClone(ctx, spec, x.pass, tmnt); err != nil {
			t.Fatalf("%s: clone: %v", c.name, err)
		}
		if got := processesNaming(cfgPath); !slices.Equal(got, pre) {
			t.Fatalf("%s: the clone is served by %v, want the prestarted %v", c.name, got, pre)
		}
		x.readsBack(c.name, tmnt)
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
