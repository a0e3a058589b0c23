package mcp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/ferry-dev/ferry/internal/atomicfile"
)

// `ferry mcp install` writes the entry an MCP client needs to start
// `ferry mcp` over stdio into that client's own JSON configuration, keeping
// every other key of the file as it was (order included).

// ClientFormat says where an MCP client keeps its servers and how it spells
// one entry.
type ClientFormat struct {
	Name string // as given to --client
	Doc  string // the client, for people
	// Key is the top-level object that maps server names to entries.
	Key string
	// Type, when not empty, is written as the entry's "type" (VS Code wants "stdio").
	Type string
	// path returns the default configuration file under home and the
	// user's configuration directory.
	path func(home, configDir string) string
}

// Clients are the MCP clients install knows, by --client name.
var Clients = []ClientFormat{
	{Name: "claude", Doc: "Claude Desktop (claude_desktop_config.json)", Key: "mcpServers",
		path: func(_, cfg string) string { return filepath.Join(cfg, "Claude", "claude_desktop_config.json") }},
	{Name: "cursor", Doc: "Cursor (~/.cursor/mcp.json)", Key: "mcpServers",
		path: func(home, _ string) string { return filepath.Join(home, ".cursor", "mcp.json") }},
	{Name: "vscode", Doc: "VS Code (the user profile's mcp.json)", Key: "servers", Type: "stdio",
		path: func(_, cfg string) string { return filepath.Join(cfg, "Code", "User", "mcp.json") }},
	{Name: "zed", Doc: "Zed (settings.json, context_servers)", Key: "context_servers",
		path: func(home, cfg string) string {
			if runtime.GOOS == "darwin" {
				// Zed keeps ~/.config on macOS too.
				return filepath.Join(home, ".config", "zed", "settings.json")
			}
			return filepath.Join(cfg, "zed", "settings.json")
		}},
}

// ClientNames lists the --client values.
func ClientNames() []string {
	var n []string
	for _, c := range Clients {
		n = append(n, c.Name)
	}
	return n
}

// LookupClient finds a client format by --client name.
func LookupClient(name string) (ClientFormat, error) {
	for _, c := range Clients {
		if strings.EqualFold(name, c.Name) {
			return c, nil
		}
	}
	return ClientFormat{}, fmt.Errorf("--client %q: use one of %s", name, strings.Join(ClientNames(), ", "))
}

// DefaultPath is the client's configuration file for the current user.
func (c ClientFormat) DefaultPath() (string, error) {
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("find the %s configuration: %w (pass --config)", c.Name, err)
	}
	cfg, err := os.UserConfigDir()
	if err != nil {
		return "", fmt.Errorf("find the %s configuration: %w (pass --config)", c.Name, err)
	}
	return c.path(home, cfg), nil
}

// Entry is one stdio server entry.
type Entry struct {
	Command string
	Args    []string
	Env     map[string]string
}

// EntryJSON is an entry as the client format spells it.
func (c ClientFormat) EntryJSON(e Entry) ([]byte, error) {
	type stdioEntry struct {
		Type    string            `json:"type,omitempty"`
		Command string            `json:"command"`
		Args    []string          `json:"args"`
		Env     map[string]string `json:"env,omitempty"`
	}
	return json.Marshal(stdioEntry{Type: c.Type, Command: e.Command, Args: e.Args, Env: e.Env})
}

// InstallResult says what Install did.
type InstallResult struct {
	Path    string
	Changed bool   // the file was written
	Replace bool   // a different entry of that name was replaced (--force)
	Entry   string // the entry as written (indented)
}

// ErrEntryDiffers is returned when the file holds another entry under the
// same name and force is off.
var ErrEntryDiffers = errors.New("a different entry exists")

// maxConfigSize bounds the configuration file read (a settings file, not data).
const maxConfigSize = 16 << 20

// Install writes entry e under name into the client's configuration file at
// path, creating it if missing. It changes nothing when an equal entry is
// already there, refuses (ErrEntryDiffers) to replace a different one unless
// force, and replaces the file atomically, through a symlink to its target,
// keeping its mode and every other key in order.
func Install(c ClientFormat, path, name string, e Entry, force bool) (InstallResult, error) {
	res := InstallResult{Path: path}
	if name == "" {
		return res, errors.New("server name: empty")
	}
	want, err := c.EntryJSON(e)
	if err != nil {
		return res, err
	}
	res.Entry = indent(want, "")
	if real, err := filepath.EvalSymlinks(path); err == nil {
		path = real
	} else if !errors.Is(err, fs.ErrNotExist) {
		return res, fmt.Errorf("%s: %w", path, err)
	}
	res.Path = path
	perm := fs.FileMode(0o600)
	var top object
	b, err := readBounded(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return res, err
	default:
		if st, err := os.Stat(path); err == nil {
			perm = st.Mode().Perm()
		}
		if len(bytes.TrimSpace(b)) > 0 {
			if err := top.UnmarshalJSON(b); err != nil {
				return res, fmt.Errorf("%s is not plain JSON (%v): ferry does not rewrite it, to keep what it holds; add this under %q by hand:\n%q: %s",
					path, err, c.Key, name, res.Entry)
			}
		}
	}
	var servers object
	if raw, ok := top.get(c.Key); ok && !isNull(raw) {
		if err := servers.UnmarshalJSON(raw); err != nil {
			return res, fmt.Errorf("%s: %q is not an object: %w", path, c.Key, err)
		}
	}
	if old, ok := servers.get(name); ok {
		if jsonEqual(old, want) {
			return res, nil
		}
		if !force {
			return res, fmt.Errorf("%w: %s already has %s %q:\n%s\nnot replacing it with:\n%s\n(pass --force to replace it, or --name to add another)",
				ErrEntryDiffers, path, c.Key, name, indent(old, ""), res.Entry)
		}
		res.Replace = true
	}
	servers.set(name, want)
	sb, err := servers.MarshalJSON()
	if err != nil {
		return res, err
	}
	top.set(c.Key, sb)
	out, err := top.MarshalJSON()
	if err != nil {
		return res, err
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, out, "", "  "); err != nil {
		return res, err
	}
	buf.WriteByte('\n')
	if err := atomicfile.WriteFile(path, buf.Bytes(), perm); err != nil {
		return res, err
	}
	res.Changed = true
	return res, nil
}

func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(b) > maxConfigSize {
		return nil, fmt.Errorf("%s is larger than %d bytes: not a client configuration", path, maxConfigSize)
	}
	return b, nil
}

func isNull(b json.RawMessage) bool { return bytes.Equal(bytes.TrimSpace(b), []byte("null")) }

func indent(b []byte, prefix string) string {
	var buf bytes.Buffer
	if json.Indent(&buf, b, prefix, "  ") != nil {
		return string(b)
	}
	return buf.String()
}

// jsonEqual compares two JSON values by meaning (key order, spacing aside).
func jsonEqual(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xb, _ := json.Marshal(x)
	yb, _ := json.Marshal(y)
	return bytes.Equal(xb, yb)
}

// object is a JSON object that keeps its keys in order and its values as
// they were written.
type object struct {
	keys []string
	vals map[string]json.RawMessage
}

func (o *object) get(k string) (json.RawMessage, bool) {
	v, ok := o.vals[k]
	return v, ok
}

func (o *object) set(k string, v json.RawMessage) {
	if o.vals == nil {
		o.vals = map[string]json.RawMessage{}
	}
	if _, ok := o.vals[k]; !ok {
		o.keys = append(o.keys, k)
	}
	o.vals[k] = v
}

func (o *object) UnmarshalJSON(b []byte) error {
	d := json.NewDecoder(bytes.NewReader(b))
	t, err := d.Token()
	if err != nil {
		return err
	}
	if t != json.Delim('{') {
		return fmt.Errorf("want a JSON object, found %v", t)
	}
	*o = object{vals: map[string]json.RawMessage{}}
	for d.More() {
		t, err := d.Token()
		if err != nil {
			return err
		}
		k, _ := t.(string)
		var v json.RawMessage
		if err := d.Decode(&v); err != nil {
			return err
		}
		if _, dup := o.vals[k]; dup {
			return fmt.Errorf("key %q appears twice", k)
		}
		o.set(k, v)
	}
	if _, err := d.Token(); err != nil {
		return err
	}
	if _, err := d.Token(); err != io.EOF {
		return errors.New("data after the top-level object")
	}
	return nil
}

func (o object) MarshalJSON() ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteByte('{')
	for i, k := range o.keys {
		if i > 0 {
			buf.WriteByte(',')
		}
		kb, err := json.Marshal(k)
		if err != nil {
			return nil, err
		}
		buf.Write(kb)
		buf.WriteByte(':')
		buf.Write(o.vals[k])
	}
	buf.WriteByte('}')
	return buf.Bytes(), nil
}
