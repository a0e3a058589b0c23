package mcp

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var testEntry = Entry{Command: "/usr/local/bin/ferry", Args: []string{"mcp", "--allow", "read", "--server", "10.0.0.1:7400"}}

func readJSON(t *testing.T, path string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s is not JSON after install: %v\n%s", path, err, b)
	}
	return m
}

func TestInstallEveryClientFormat(t *testing.T) {
	for _, c := range Clients {
		t.Run(c.Name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "sub", "config.json")
			res, err := Install(c, path, "ferry", testEntry, false)
			if err != nil {
				t.Fatal(err)
			}
			if !res.Changed || res.Replace || res.Path != path {
				t.Fatalf("result %+v", res)
			}
			m := readJSON(t, path)
			servers, _ := m[c.Key].(map[string]any)
			e, _ := servers["ferry"].(map[string]any)
			if e["command"] != testEntry.Command || len(e["args"].([]any)) != len(testEntry.Args) || e["args"].([]any)[2] != "read" {
				t.Fatalf("%s entry: %v", c.Key, m)
			}
			if typ, has := e["type"]; c.Type != "" && typ != c.Type || c.Type == "" && has {
				t.Fatalf("type %v, want %q", typ, c.Type)
			}
			st, err := os.Stat(path)
			if err != nil || st.Mode().Perm() != 0o600 {
				t.Fatalf("a new configuration has mode %v (%v), want 0600", st.Mode(), err)
			}
		})
	}
}

func TestInstallKeepsTheRestAndIsIdempotent(t *testing.T) {
	c, err := LookupClient("claude")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "claude_desktop_config.json")
	orig := `{
  "zeta": 1,
  "mcpServers": {"other": {"command": "x", "args": ["y"]}},
  "alpha": {"b": [1, 2], "a": null}
}
`
	if err := os.WriteFile(path, []byte(orig), 0o640); err != nil {
		t.Fatal(err)
	}
	res, err := Install(c, path, "ferry", testEntry, false)
	if err != nil || !res.Changed {
		t.Fatalf("install: %+v %v", res, err)
	}
	b, _ := os.ReadFile(path)
	got := string(b)
	// Keys stay in their order, the other server stays, the mode stays.
	if zi, mi, ai := strings.Index(got, `"zeta"`), strings.Index(got, `"mcpServers"`), strings.Index(got, `"alpha"`); zi < 0 || !(zi < mi && mi < ai) {
		t.Fatalf("key order lost:\n%s", got)
	}
	if oi, fi := strings.Index(got, `"other"`), strings.Index(got, `"ferry"`); oi < 0 || fi < oi {
		t.Fatalf("the new entry is not after the existing one:\n%s", got)
	}
	if bi, ai := strings.Index(got, `"b"`), strings.Index(got, `"a": null`); bi < 0 || ai < bi {
		t.Fatalf("nested keys reordered or lost:\n%s", got)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o640 {
		t.Fatalf("mode %v, want the file's own 0640", st.Mode())
	}
	m := readJSON(t, path)
	if m["zeta"] != float64(1) || m["mcpServers"].(map[string]any)["other"].(map[string]any)["command"] != "x" {
		t.Fatalf("other keys changed: %v", m)
	}

	// Again: nothing to do, and the file is not even rewritten.
	st1, _ := os.Stat(path)
	res, err = Install(c, path, "ferry", testEntry, false)
	if err != nil || res.Changed {
		t.Fatalf("second install: %+v %v", res, err)
	}
	st2, _ := os.Stat(path)
	if !os.SameFile(st1, st2) || !st1.ModTime().Equal(st2.ModTime()) {
		t.Fatal("an idempotent install replaced the file")
	}
	if b2, _ := os.ReadFile(path); string(b2) != got {
		t.Fatal("an idempotent install changed the file")
	}

	// A different entry under the same name is not clobbered without force.
	other := testEntry
	other.Args = append([]string{}, testEntry.Args...)
	other.Args[2] = "admin"
	_, err = Install(c, path, "ferry", other, false)
	if !errors.Is(err, ErrEntryDiffers) || !strings.Contains(err.Error(), "--force") || !strings.Contains(err.Error(), `"read"`) {
		t.Fatalf("install over a different entry: %v", err)
	}
	if b2, _ := os.ReadFile(path); string(b2) != got {
		t.Fatal("a refused install changed the file")
	}
	// Another name is fine; force replaces.
	if res, err := Install(c, path, "ferry-admin", other, false); err != nil || !res.Changed || res.Replace {
		t.Fatalf("install under another name: %+v %v", res, err)
	}
	if res, err := Install(c, path, "ferry", other, true); err != nil || !res.Changed || !res.Replace {
		t.Fatalf("forced install: %+v %v", res, err)
	}
	servers := readJSON(t, path)["mcpServers"].(map[string]any)
	if len(servers) != 3 || servers["ferry"].(map[string]any)["args"].([]any)[2] != "admin" {
		t.Fatalf("after force: %v", servers)
	}
	// No temporary file is left next to it.
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Fatalf("files beside the configuration: %v", ents)
	}
}

func TestInstallRefusesWhatItCannotKeep(t *testing.T) {
	zed, _ := LookupClient("zed")
	dir := t.TempDir()
	cases := map[string]string{
		"comments":        "// Zed settings\n{\n  \"theme\": \"One Dark\"\n}\n",
		"trailing comma":  `{"theme": "x",}`,
		"array":           `[1, 2]`,
		"duplicate key":   `{"a": 1, "a": 2}`,
		"servers not obj": `{"context_servers": [1]}`,
		"two values":      `{"a": 1} {"b": 2}`,
	}
	for name, body := range cases {
		path := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".json")
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Install(zed, path, "ferry", testEntry, true); err == nil {
			t.Errorf("%s: installed into %q", name, body)
		} else if name == "comments" && !strings.Contains(err.Error(), "by hand") {
			t.Errorf("%s: the refusal does not give the entry to add by hand: %v", name, err)
		}
		if b, _ := os.ReadFile(path); string(b) != body {
			t.Errorf("%s: a refused install changed the file to %s", name, b)
		}
	}
	// An empty file or a null key is an empty configuration.
	for _, body := range []string{"", "{\"context_servers\": null}"} {
		path := filepath.Join(dir, "empty.json")
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Install(zed, path, "ferry", testEntry, false); err != nil {
			t.Fatalf("install into %q: %v", body, err)
		}
		if _, ok := readJSON(t, path)["context_servers"].(map[string]any)["ferry"]; !ok {
			t.Fatalf("no entry after installing into %q", body)
		}
	}
}

func TestInstallFollowsSymlink(t *testing.T) {
	c, _ := LookupClient("cursor")
	dir := t.TempDir()
	target := filepath.Join(dir, "dotfiles", "mcp.json")
	if err := os.MkdirAll(filepath.Dir(target), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(target, []byte(`{"mcpServers": {}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "mcp.json")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	res, err := Install(c, link, "ferry", testEntry, false)
	if err != nil || res.Path != target {
		t.Fatalf("install through a link: %+v %v", res, err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("the link was replaced by a file: %v %v", fi, err)
	}
	if _, ok := readJSON(t, target)["mcpServers"].(map[string]any)["ferry"]; !ok {
		t.Fatal("the link's target has no entry")
	}
}

func TestLookupClient(t *testing.T) {
	for _, n := range []string{"claude", "Cursor", "vscode", "zed"} {
		c, err := LookupClient(n)
		if err != nil {
			t.Fatal(err)
		}
		p, err := c.DefaultPath()
		if err != nil || !filepath.IsAbs(p) || !strings.HasSuffix(p, ".json") {
			t.Fatalf("%s default path %q: %v", n, p, err)
		}
	}
	if _, err := LookupClient("emacs"); err == nil || !strings.Contains(err.Error(), "claude, cursor, vscode, zed") {
		t.Fatalf("unknown client: %v", err)
	}
}
