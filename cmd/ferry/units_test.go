package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/ferry-dev/ferry/internal/testenv"
)

// unitsDir holds the systemd units and the example environment files that
// go to /etc/ferry.
const unitsDir = "../../deploy/systemd"

// installedExe is where the units expect the binary.
const installedExe = "/usr/local/bin/ferry"

var units = []struct{ unit, env string }{
	{"ferry-server.service", "server.env"},
	{"ferry-agent.service", "agent.env"},
}

// unitValues returns the values of key in section of a unit file, in order.
func unitValues(t *testing.T, path, section, key string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	cur := ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case strings.HasPrefix(line, "["):
			cur = strings.Trim(line, "[]")
		case strings.HasSuffix(line, `\`):
			t.Fatalf("%s: continuation lines are not read by this test; keep each setting on one line", path)
		default:
			k, v, _ := strings.Cut(line, "=")
			if cur == section && strings.TrimSpace(k) == key {
				out = append(out, strings.TrimSpace(v))
			}
		}
	}
	return out
}

// envFile reads an EnvironmentFile as systemd does for the plain KEY=VALUE
// lines these files use (a quoted value is unquoted).
func envFile(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s:%d: not KEY=VALUE: %q", path, i+1, line)
		}
		if len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0] {
			v = v[1 : len(v)-1]
		}
		env[k] = v
	}
	return env
}

var braced = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}`)

// execWords expands an ExecStart line the way systemd does: a word that is
// exactly ${VAR} becomes one argument, a word that is exactly $VAR splits
// into the value's words (none when empty), ${VAR} inside a word is
// replaced in place. A variable the environment file does not set fails.
func execWords(t *testing.T, line string, env map[string]string) []string {
	t.Helper()
	if strings.ContainsAny(line, `"'\`) {
		t.Fatalf("ExecStart %q: quotes and escapes are not read by this test; use plain words", line)
	}
	line = strings.TrimLeft(line, "-@:+!")
	lookup := func(name string) string {
		v, ok := env[name]
		if !ok {
			t.Errorf("ExecStart uses $%s, which the environment file does not set", name)
		}
		return v
	}
	var words []string
	for _, w := range strings.Fields(line) {
		switch {
		case strings.HasPrefix(w, "$") && !strings.HasPrefix(w, "${"):
			words = append(words, strings.Fields(lookup(w[1:]))...)
		default:
			words = append(words, braced.ReplaceAllStringFunc(w, func(m string) string {
				return lookup(braced.FindStringSubmatch(m)[1])
			}))
		}
	}
	return words
}

// parseWithFerry parses args (without the program name) with the binary's
// own command tree: the subcommand must exist and accept every flag and the
// positional arguments given. The flags it set are put back afterwards,
// since the tree is shared with the other tests.
func parseWithFerry(args []string) error {
	line := "ferry " + strings.Join(args, " ")
	cmd, rest, err := rootCmd.Find(args)
	if err != nil {
		return fmt.Errorf("%s: %w", line, err)
	}
	if cmd == rootCmd {
		return fmt.Errorf("%s: names no subcommand", line)
	}
	defer func() {
		cmd.Flags().VisitAll(func(f *pflag.Flag) {
			if f.Changed {
				_ = f.Value.Set(f.DefValue)
				f.Changed = false
			}
		})
	}()
	if err := cmd.ParseFlags(rest); err != nil {
		return fmt.Errorf("%s: %w", line, err)
	}
	if err := cmd.ValidateArgs(cmd.Flags().Args()); err != nil {
		return fmt.Errorf("%s: %w", line, err)
	}
	if err := cmd.ValidateRequiredFlags(); err != nil {
		return fmt.Errorf("%s: %w", line, err)
	}
	return nil
}

// TestSystemdUnitsStartFerry: each unit's ExecStart, expanded with the
// example environment file, is a command line this binary accepts, and every
// variable it uses is set there.
func TestSystemdUnitsStartFerry(t *testing.T) {
	for _, u := range units {
		t.Run(u.unit, func(t *testing.T) {
			starts := unitValues(t, filepath.Join(unitsDir, u.unit), "Service", "ExecStart")
			if len(starts) != 1 {
				t.Fatalf("%d ExecStart lines, want 1", len(starts))
			}
			envFiles := unitValues(t, filepath.Join(unitsDir, u.unit), "Service", "EnvironmentFile")
			if len(envFiles) != 1 || envFiles[0] != "/etc/ferry/"+u.env {
				t.Fatalf("EnvironmentFile %q, want /etc/ferry/%s (its example is deploy/systemd/%s)", envFiles, u.env, u.env)
			}
			env := envFile(t, filepath.Join(unitsDir, u.env))
			words := execWords(t, starts[0], env)
			if len(words) < 2 || words[0] != installedExe {
				t.Fatalf("ExecStart runs %q, want %s", words, installedExe)
			}
			if err := parseWithFerry(words[1:]); err != nil {
				t.Fatal(err)
			}
			for _, w := range words {
				if w == "" {
					t.Errorf("ExecStart expands to an empty argument: %q", words)
				}
			}
			// systemd makes the data dir (and, under ProtectSystem=strict,
			// it is the one writable path): it must be the one ferry uses.
			state := unitValues(t, filepath.Join(unitsDir, u.unit), "Service", "StateDirectory")
			i := slices.Index(words, "--data-dir")
			if len(state) != 1 || i < 0 || i+1 >= len(words) || words[i+1] != "/var/lib/"+state[0] {
				t.Errorf("StateDirectory %q does not name the --data-dir of %q", state, words)
			}
		})
	}
	// The other form of the server's extra arguments: the first server.
	env := envFile(t, filepath.Join(unitsDir, "server.env"))
	env["FERRY_SERVER_ARGS"] = "--bootstrap"
	starts := unitValues(t, filepath.Join(unitsDir, "ferry-server.service"), "Service", "ExecStart")
	if err := parseWithFerry(execWords(t, starts[0], env)[1:]); err != nil {
		t.Fatal(err)
	}
}

// TestParseWithFerryRefuses proves the check above can fail: an unknown
// flag, a stray argument and an unknown command are each refused.
func TestParseWithFerryRefuses(t *testing.T) {
	for _, args := range [][]string{
		{"server", "--name", "s1", "--no-such-flag"},
		{"agent", "--worker", "w", "stray"},
		{"no-such-command"},
	} {
		if err := parseWithFerry(args); err == nil {
			t.Errorf("ferry %s: accepted", strings.Join(args, " "))
		}
	}
}

// TestSystemdAnalyzeVerify runs `systemd-analyze verify` on the units, with
// ExecStart pointing at an executable that exists here (verify checks it).
// Any complaint about a unit (an unknown key, a bad value) fails.
func TestSystemdAnalyzeVerify(t *testing.T) {
	testenv.Tools(t, "apt-get install systemd (scripts/packages.txt)", "systemd-analyze")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var paths []string
	for _, u := range units {
		b, err := os.ReadFile(filepath.Join(unitsDir, u.unit))
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, u.unit)
		if err := os.WriteFile(p, bytes.ReplaceAll(b, []byte(installedExe), []byte(exe)), 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	cmd := exec.Command("systemd-analyze", append([]string{"verify", "--man=no"}, paths...)...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	var complaints []string
	for _, l := range strings.Split(string(out), "\n") {
		for _, u := range units {
			if strings.Contains(l, u.unit) {
				complaints = append(complaints, l)
				break
			}
		}
	}
	if err != nil || len(complaints) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
