package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
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
