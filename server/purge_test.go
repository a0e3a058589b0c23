package server_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/sealing"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server/servertest"
)

// filesContaining lists the files under dir holding any of needles.
func filesContaining(t *testing.T, dir string, needles ...[]byte) []string {
	t.Helper()
	var out []string
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		for _, n := range needles {
			if bytes.Contains(b, n) {
				out = append(out, p)
				break
			}
		}
		return nil
	})
	return out
}

// TestDestroyPurgesEnvelopes: once a volume is destroyed every server
// snapshots and compacts its log, so neither raft.db nor any snapshot
// still holds the volume's envelopes.
func TestDestroyPurgesEnvelopes(t *testing.T) {
	c := servertest.New(t, 3, servertest.Options{})
	ctx := context.Background()
	w := c.Client("w-src", tlsutil.KindWorker)
	op := c.Client("operator", tlsutil.KindOperator)
	_, err := w.RegisterWorker(ctx, fsm.Worker{Name: "w-src", HostID: 1}, time.Hour)
	check(t, err)
	wk, err := sealing.Generate()
	check(t, err)
	_, err = w.SetWorkerKey(ctx, "w-src", wk.Public())
	check(t, err)
	_, err = w.CreateVolume(ctx, fsm.Volume{ID: "doomed", Worker: "w-src", Size: 1 << 20, State: fsm.VolCreated})
	check(t, err)
	pass := []byte("purge-me-0123456789abcdef0123456789abcdef0123456789abcdef01234567")
	owner, err := sealing.Seal(wk.Public(), sealing.Binding{Volume: "doomed", Recipient: "w-src", Purpose: fsm.PurposeOwner}, pass, "test")
	check(t, err)
	rec, err := sealing.Seal(c.Recovery.Public(), sealing.Binding{Volume: "doomed", Recipient: fsm.RecoveryRecipient, Purpose: fsm.PurposeRecovery}, pass, "test")
	check(t, err)
	_, err = w.PutEnvelopes(ctx, "doomed", []fsm.Envelope{owner, rec})
	check(t, err)
	// Some traffic after the envelopes, and a routine snapshot that holds them.
	for i := 0; i < 5; i++ {
		_, err = w.Heartbeat(ctx, "w-src", time.Hour)
		check(t, err)
	}
	needles := [][]byte{
		[]byte(base64.StdEncoding.EncodeToString(owner.Ciphertext[:600])),
		[]byte(base64.StdEncoding.EncodeToString(rec.Ciphertext[:600])),
	}
	c.WaitConverged(10 * time.Second)
	for i := range c.Servers {
		if err := c.Servers[i].Node().Raft.Snapshot().Error(); err != nil {
			t.Fatalf("snapshot s%d: %v", i, err)
		}
		if got := filesContaining(t, filepath.Join(c.Dir, fmt.Sprintf("s%d", i)), needles...); len(got) == 0 {
			t.Fatalf("s%d: the envelopes are in no file before destroy: the check below would prove nothing", i)
		}
	}

	// The log keys in use while the envelopes were written.
	epochs := func(i int) map[uint32]bool {
		b, err := os.ReadFile(filepath.Join(c.Dir, fmt.Sprintf("s%d", i), "raft", "logkeys.json"))
		check(t, err)
		var ring struct{ Epochs []struct{ ID uint32 } }
		check(t, json.Unmarshal(b, &ring))
		out := map[uint32]bool{}
		for _, e := range ring.Epochs {
			out[e.ID] = true
		}
		return out
	}
	var before []map[uint32]bool
	for i := range c.Servers {
		before = append(before, epochs(i))
	}

	_, err = op.DestroyVolume(ctx, "doomed", time.Millisecond)
	check(t, err)
	time.Sleep(5 * time.Millisecond)
	v, err := op.DestroyVolume(ctx, "doomed", 0)
	check(t, err)
	if v.State != fsm.VolDestroyed {
		t.Fatalf("volume %s", v.State)
	}
	if envs, err := op.ListEnvelopes(ctx, "doomed"); err != nil || len(envs) != 0 {
		t.Fatalf("envelopes after destroy: %+v %v", envs, err)
	}
	if _, err := w.GetEnvelope(ctx, "doomed", fsm.PurposeOwner, 0); api.ErrorCode(err) != fsm.CodeWrongState {
		t.Fatalf("owner envelope of a destroyed volume: %v", err)
	}
	c.WaitConverged(10 * time.Second)
	deadline := time.Now().Add(20 * time.Second)
	for i := range c.Servers {
		dir := filepath.Join(c.Dir, fmt.Sprintf("s%d", i))
		for {
			got := filesContaining(t, dir, needles...)
			if len(got) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("s%d still holds the destroyed volume's envelopes in %s", i, strings.Join(got, ", "))
			}
			time.Sleep(100 * time.Millisecond)
		}
		// raft.db frees compacted pages without overwriting them: what
		// makes them unreadable is that their log key is destroyed.
		for {
			left := 0
			for id := range epochs(i) {
				if before[i][id] {
					left++
				}
			}
			if left == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("s%d keeps %d log keys that encrypted the destroyed volume's envelopes", i, left)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}
