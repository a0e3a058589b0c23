package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server/servertest"
)

// TestMcpStdio runs `ferry mcp` in-process on a pipe pair, as an MCP client
// would on its stdin and stdout, against a real server, and drives it with
// the SDK's client.
func TestMcpStdio(t *testing.T) {
	cl := servertest.New(t, 1, servertest.Options{})
	ctx := context.Background()
	wa := cl.Client("a", tlsutil.KindWorker)
	if _, err := wa.RegisterWorker(ctx, fsm.Worker{Name: "a", HostID: 1, Address: "127.0.0.1"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"v1", "v2"} {
		if _, err := wa.CreateVolume(ctx, fsm.Volume{ID: id, Worker: "a", Size: 8 << 20, State: fsm.VolCreated}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := cl.Client("operator", tlsutil.KindOperator).CreateMachine(ctx, fsm.Machine{ID: "m1", Worker: "a", Volume: "v1", State: fsm.MachineRunning}); err != nil {
		t.Fatal(err)
	}
	cl.Client("operator", tlsutil.KindOperator) // issues the certificate ferry mcp presents

	inR, inW := io.Pipe()   // client -> ferry mcp's stdin
	outR, outW := io.Pipe() // ferry mcp's stdout -> client
	rootCmd.SetIn(inR)
	rootCmd.SetOut(outW)
	rootCmd.SetArgs([]string{"mcp", "--http=", "--allow", "admin", "--plan-ttl", "1m",
		"--server", strings.Join(cl.Addrs(), ","), "--tls-dir", cl.TLSDir, "--cert", "operator", "--log-level", "error"})
	done := make(chan error, 1)
	go func() {
		done <- rootCmd.Execute()
		outW.Close()
	}()
	t.Cleanup(func() {
		rootCmd.SetIn(nil)
		rootCmd.SetOut(nil)
		rootCmd.SetArgs(nil)
	})

	cs, err := sdk.NewClient(&sdk.Implementation{Name: "ferry-test", Version: "1"}, nil).
		Connect(ctx, &sdk.IOTransport{Reader: outR, Writer: inW}, nil)
	if err != nil {
		t.Fatal(err)
	}
	call := func(name string, args any) (*sdk.CallToolResult, string) {
		t.Helper()
		res, err := cs.CallTool(ctx, &sdk.CallToolParams{Name: name, Arguments: args})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var sb strings.Builder
		for _, c := range res.Content {
			if tc, ok := c.(*sdk.TextContent); ok {
				sb.WriteString(tc.Text)
			}
		}
		return res, sb.String()
	}

	res, msg := call("volume_destroy_plan", map[string]any{"id": "v1"})
	if !res.IsError || !strings.Contains(msg, "volume v1 is attached to machine m1") {
		t.Fatalf("destroy of an attached volume: error %v, %q", res.IsError, msg)
	}
	res, msg = call("volume_destroy_plan", map[string]any{"id": "v2"})
	if res.IsError {
		t.Fatal(msg)
	}
	var plan struct {
		Token string `json:"plan_token"`
	}
	b, _ := json.Marshal(res.StructuredContent)
	if err := json.Unmarshal(b, &plan); err != nil || plan.Token == "" {
		t.Fatalf("plan %s: %v", b, err)
	}
	if res, msg = call("volume_destroy_apply", map[string]any{"plan_token": plan.Token}); res.IsError {
		t.Fatal(msg)
	}
	if v, err := wa.GetVolume(ctx, "v2"); err != nil || v.State != fsm.VolPendingDelete {
		t.Fatalf("v2 after apply: %+v, %v", v, err)
	}

	cs.Close()
	inW.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ferry mcp ended with %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ferry mcp did not end when its stdin closed")
	}
}

// TestMcpRefusesRemoteHTTP: --http beyond loopback needs its own flag.
func TestMcpRefusesRemoteHTTP(t *testing.T) {
	rootCmd.SetArgs([]string{"mcp", "--http", "0.0.0.0:0", "--tls-dir", t.TempDir()})
	t.Cleanup(func() { rootCmd.SetArgs(nil) })
	err := rootCmd.Execute()
	var ee *exitError
	if err == nil || !strings.Contains(err.Error(), "beyond loopback") || !errors.As(err, &ee) || ee.code != ExitUsage {
		t.Fatalf("got %v, want a usage refusal naming loopback", err)
	}
}

// runOut runs the CLI and returns what it printed. Cobra keeps flag values
// between runs in one process, so callers pass every flag they rely on.
func runOut(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out strings.Builder
	rootCmd.SetOut(&out)
	rootCmd.SetErr(&out)
	rootCmd.SetArgs(args)
	defer func() { rootCmd.SetArgs(nil); rootCmd.SetOut(nil); rootCmd.SetErr(nil) }()
	err := rootCmd.Execute()
	return out.String(), err
}

// TestMcpInstall writes a VS Code configuration twice (the second time
// changes nothing), refuses another entry under the same name, and replaces
// it with --force.
func TestMcpInstall(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "Code", "User", "mcp.json")
	t.Chdir(dir)
	args := func(allow string, force bool) []string {
		return []string{"mcp", "install", "--client", "vscode", "--config", cfg, "--name", "ferry", "--allow", allow,
			"--command", "/opt/ferry/bin/ferry", "--server", "10.1.0.1:7400,10.1.0.2:7400", "--tls-dir", "tls", "--cert", "alice",
			"--force=" + strconv.FormatBool(force), "--print=false", "--json=false"}
	}
	out, err := runOut(t, args("read", false)...)
	if err != nil || !strings.Contains(out, "added") {
		t.Fatalf("install: %v\n%s", err, out)
	}
	b, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Servers map[string]struct {
			Type    string   `json:"type"`
			Command string   `json:"command"`
			Args    []string `json:"args"`
		} `json:"servers"`
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	e := got.Servers["ferry"]
	want := []string{"mcp", "--allow", "read", "--server", "10.1.0.1:7400,10.1.0.2:7400", "--tls-dir", filepath.Join(dir, "tls"), "--cert", "alice"}
	if e.Type != "stdio" || e.Command != "/opt/ferry/bin/ferry" || !slices.Equal(e.Args, want) {
		t.Fatalf("entry %+v, want args %v (the TLS dir made absolute)", e, want)
	}
	if out, err := runOut(t, args("read", false)...); err != nil || !strings.Contains(out, "nothing to do") {
		t.Fatalf("second install: %v\n%s", err, out)
	}
	out, err = runOut(t, append(args("read", false), "--json")...)
	var res struct {
		Path     string `json:"path"`
		Changed  bool   `json:"changed"`
		Replaced bool   `json:"replaced"`
		Entry    struct {
			Args []string `json:"args"`
		} `json:"entry"`
	}
	if err != nil || json.Unmarshal([]byte(out), &res) != nil || res.Path != cfg || res.Changed || res.Replaced || !slices.Equal(res.Entry.Args, want) {
		t.Fatalf("install --json: %v %+v\n%s", err, res, out)
	}
	_, err = runOut(t, args("admin", false)...)
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != ExitRefused || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("install over a different entry: %v", err)
	}
	if b2, _ := os.ReadFile(cfg); string(b2) != string(b) {
		t.Fatal("a refused install changed the configuration")
	}
	if out, err := runOut(t, args("admin", true)...); err != nil || !strings.Contains(out, "replaced") || !strings.Contains(out, `"admin"`) {
		t.Fatalf("forced install: %v\n%s", err, out)
	}
	if _, err := runOut(t, "mcp", "install", "--client", "emacs", "--force=false"); !errors.As(err, &ee) || ee.code != ExitUsage {
		t.Fatalf("unknown client: %v", err)
	}
}
