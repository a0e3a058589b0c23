package server_test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server/servertest"
)

// The write routes share one helper; these pin the order of its steps as
// each route had it: a refusal on the caller's identity comes before the
// body is read, routes that take no body ignore one, and each route keeps
// its status code.
func TestWriteRoutesOrderAndStatus(t *testing.T) {
	c := servertest.New(t, 1, servertest.Options{})
	f := setupFleet(t, c) // workers w-src, w-dst, w-other; migration m1
	ctx := context.Background()
	_, err := f.op.CreateVolume(ctx, fsm.Volume{ID: "vol2", Worker: "w-other", Size: 48 << 20, State: fsm.VolCreated, Layout: layout()})
	check(t, err)
	_, err = f.op.CreateMachine(ctx, fsm.Machine{ID: "mach2", Worker: "w-other", Volume: "vol2", Network: 8, MachineNo: 2, State: fsm.MachineRunning})
	check(t, err)
	raw := func(cert, method, path, body string) (int, string) {
		t.Helper()
		tc, err := tlsutil.ClientConfig(c.TLSDir, cert)
		if err != nil {
			t.Fatal(err)
		}
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tc}, Timeout: 20 * time.Second}
		defer hc.CloseIdleConnections()
		req, err := http.NewRequest(method, "https://"+c.Servers[c.WaitLeader(10*time.Second)].Addr()+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b))
	}
	for _, tc := range []struct {
		what, cert, method, path, body string
		want                           int
	}{
		// Identity first: a body that does not parse is not looked at.
		{"worker revokes", "w-src", http.MethodPost, "/v1/certs/revoked", "not json", http.StatusForbidden},
		{"worker joins", "w-src", http.MethodPost, "/v1/internal/join", "not json", http.StatusForbidden},
		{"worker removes a server", "w-src", http.MethodDelete, "/v1/servers/s9", "not json", http.StatusForbidden},
		{"worker cancels a drain", "w-src", http.MethodDelete, "/v1/drains/w-src", "not json", http.StatusForbidden},
		// Past the identity check, the body is strict.
		{"operator revokes garbage", "operator", http.MethodPost, "/v1/certs/revoked", "not json", http.StatusBadRequest},
		{"operator revokes with an unknown field", "operator", http.MethodPost, "/v1/certs/revoked", `{"serial":"01","admin":true}`, http.StatusBadRequest},
		// A route without a body builds its command whatever the body holds:
		// the store answers (no such volume, no running drain), not the decoder.
		{"destroy ignores a body", "operator", http.MethodDelete, "/v1/volumes/nope", "not json", http.StatusNotFound},
		{"cancel ignores a body", "operator", http.MethodDelete, "/v1/drains/w-other", "not json", http.StatusNotFound},
		{"destroy with a bad retention", "operator", http.MethodDelete, "/v1/volumes/nope?retention=soon", "", http.StatusBadRequest},
		// Status codes: creations answer 201, other writes 200.
		{"plan of a locked volume", "operator", http.MethodPost, "/v1/migrations", `{"id":"m-wr","machine":"mach1","target":"w-other"}`, http.StatusConflict},
		{"plan", "operator", http.MethodPost, "/v1/migrations", `{"id":"m-wr2","machine":"mach2","target":"w-dst"}`, http.StatusCreated},
		{"cordon", "operator", http.MethodPost, "/v1/workers/w-other/cordon", `{"cordoned":true}`, http.StatusOK},
		{"drain", "operator", http.MethodPost, "/v1/drains", `{"worker":"w-dst"}`, http.StatusCreated},
		{"abort", "operator", http.MethodPost, "/v1/migrations/m1/abort", `{"reason":"test","step_id":"a1"}`, http.StatusOK},
	} {
		if got, body := raw(tc.cert, tc.method, tc.path, tc.body); got != tc.want {
			t.Errorf("%s: %s %s answered %d %s, want %d", tc.what, tc.method, tc.path, got, body, tc.want)
		}
	}
}
