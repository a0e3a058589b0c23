package e2e

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// secretForms are the ways a secret could be written down: raw, hex
// (either case) and base64 (standard and URL alphabets, padding dropped so a
// padded and an unpadded copy both match).
func secretForms(secret []byte) [][]byte {
	return [][]byte{
		secret,
		[]byte(hex.EncodeToString(secret)),
		[]byte(strings.ToUpper(hex.EncodeToString(secret))),
		[]byte(strings.TrimRight(base64.StdEncoding.EncodeToString(secret), "=")),
		[]byte(strings.TrimRight(base64.URLEncoding.EncodeToString(secret), "=")),
	}
}

type secret struct {
	name  string
	forms [][]byte
}

// containsAny streams r and reports which secret appears in it.
func containsAny(r io.Reader, secrets []secret) []string {
	longest := 0
	for _, s := range secrets {
		for _, f := range s.forms {
			longest = max(longest, len(f))
		}
	}
	buf := make([]byte, 1<<20+longest)
	keep := 0
	found := map[string]bool{}
	for {
		n, err := io.ReadFull(r, buf[keep:])
		data := buf[:keep+n]
		for _, s := range secrets {
			for _, f := range s.forms {
				if bytes.Contains(data, f) {
					found[s.name] = true
				}
			}
		}
		if err != nil {
			break
		}
		keep = min(longest, len(data))
		copy(buf, data[len(data)-keep:])
	}
	var out []string
	for n := range found {
		out = append(out, n)
	}
	return out
}

// scanKeyMaterial searches every file under dir (servers' and agents' data
// dirs with raft/ and volumes/, every log, machine mounts: no exclusions)
// and every process's cmdline and environ for the secrets. It returns what
// it found where, and the files it read.
func scanKeyMaterial(t *testing.T, dir string, secrets []secret) (leaks []string, scanned []string) {
	t.Helper()
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		f, err := os.Open(path)
		if err != nil {
			return nil
		}
		defer f.Close()
		scanned = append(scanned, path)
		for _, n := range containsAny(f, secrets) {
			leaks = append(leaks, n+" in "+path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		for _, what := range []string{"cmdline", "environ"} {
			b, err := os.ReadFile(filepath.Join(p, what))
			if err != nil {
				continue // the process ended
			}
			for _, n := range containsAny(bytes.NewReader(b), secrets) {
				comm, _ := os.ReadFile(filepath.Join(p, "comm"))
				leaks = append(leaks, n+" in "+p+"/"+what+" ("+strings.TrimSpace(string(comm))+")")
			}
		}
	}
	return leaks, scanned
}

// masterKey asks cryptsetup for a LUKS2 volume's master key, with the
// passphrase in a key file outside the cluster's dir (the scan must not
// find the test's own copy).
func masterKey(t *testing.T, path string, pass []byte) []byte {
	t.Helper()
	kf := filepath.Join(t.TempDir(), "pass")
	if err := os.WriteFile(kf, pass, 0o600); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(kf)
	out, err := exec.Command("cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", kf, path).CombinedOutput()
	if err != nil {
		t.Fatalf("cryptsetup luksDump --dump-volume-key: %v\n%s", err, out)
	}
	i := bytes.Index(out, []byte("MK dump:"))
	if i < 0 {
		t.Fatalf("no MK dump in luksDump output")
	}
	mk, err := hex.DecodeString(strings.Join(strings.Fields(string(out[i+len("MK dump:"):])), ""))
	if err != nil || len(mk) < 32 {
		t.Fatalf("parse MK dump: %v", err)
	}
	return mk
}

// TestKeyMaterialScan: after a full migration, neither the passphrase nor
// the LUKS master key is written anywhere in the cluster (raft log,
// snapshots, volumes, logs, state files) nor in any process's command line
// or environment. They live only in the memory of the datapath using them.
func TestKeyMaterialScan(t *testing.T) {
	e := newEnv(t, 2)
	a, b := e.ws[0], e.ws[1]
	e.createVolume("vols", a, volSize)
	ack, _ := e.runMachine("ms", a, "vols", 11)
	e.waitAcked(ack, 50, time.Minute)
	id := e.migrate("ms", b)
	m := e.waitState(id, 3*time.Minute, fsm.Completed)
	e.waitAcked(ack, 60, time.Minute) // running on the target, datapaths up

	pass := []byte(e.keys["vols"])
	mk := masterKey(t, sourceFile(e, a, "vols"), pass)
	if tmk := masterKey(t, sourceFile(e, b, m.TargetVol), pass); !bytes.Equal(tmk, mk) {
		t.Fatal("source and destination volumes have different master keys")
	}
	secrets := []secret{{"passphrase", secretForms(pass)}, {"master key", secretForms(mk)}}
	leaks, scanned := scanKeyMaterial(t, e.dir, secrets)
	for _, l := range leaks {
		t.Errorf("key material found: %s", l)
	}
	// The scan must have read the places that matter, or it proves nothing.
	sid := e.bed.ServerIDs()[0]
	for _, want := range []string{"/server-" + sid + "/raft/raft.db", "/volumes/vols/data", "/volumes/" + m.TargetVol + "/data", "server-" + sid + ".log", "agent-" + b + ".log"} {
		found := false
		for _, s := range scanned {
			found = found || strings.HasSuffix(s, want) || strings.Contains(s, want)
		}
		if !found {
			t.Errorf("the scan did not read %s", want)
		}
	}
	// The scanner finds every form, also across its read boundary (the old
	// code failed this test: the passphrase was found in raft.db).
	for _, f := range secrets[0].forms {
		for _, off := range []int{0, 1<<20 - 7, 3 << 20} {
			blob := append(append(bytes.Repeat([]byte{0xa5}, off), f...), 0x5a)
			if len(containsAny(bytes.NewReader(blob), secrets)) == 0 {
				t.Fatalf("the scanner misses %q at offset %d", f[:8], off)
			}
		}
	}
	t.Logf("scanned %d files and every process's cmdline and environ", len(scanned))
}
