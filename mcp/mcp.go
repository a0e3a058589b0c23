// Package mcp is `ferry mcp`: a Model Context Protocol server that lets an
// agent read ferry's registries and change them through plan-then-apply. It
// talks to the ferry servers with the caller's certificate through
// api.Client, like every CLI command, so the servers' guards and refusals
// apply unchanged; the tools add plan tokens on top (see plan.go) and
// refuse at plan time what the servers would refuse at apply time, in the
// servers' words.
package mcp

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
)

// Group is a tool group; each includes the ones below it.
type Group int

const (
	Read  Group = iota // lists, shows, statuses
	Write              // plus create, migrate and drain (plan and apply)
	Admin              // plus destroy and abort (plan and apply)
)

func (g Group) String() string {
	switch g {
	case Read:
		return "read"
	case Write:
		return "write"
	case Admin:
		return "admin"
	}
	return fmt.Sprintf("group(%d)", int(g))
}

// ParseGroup reads read, write or admin.
func ParseGroup(s string) (Group, error) {
	for _, g := range []Group{Read, Write, Admin} {
		if strings.EqualFold(strings.TrimSpace(s), g.String()) {
			return g, nil
		}
	}
	return 0, fmt.Errorf("tool group %q: use read, write or admin", s)
}

// DefaultPlanTTL is how long a plan token stays valid.
const DefaultPlanTTL = 5 * time.Minute

// Options tune a Server; zero values are fine.
type Options struct {
	Allow   Group            // the tool groups offered (default Read)
	PlanTTL time.Duration    // plan token lifetime (default DefaultPlanTTL)
	Log     zerolog.Logger   // one line per tool call
	Now     func() time.Time // the clock plan tokens expire by (tests)
	Version string           // reported to clients
}

// Server is one MCP server over one ferry cluster client.
type Server struct {
	c     *api.Client
	srv   *sdk.Server
	plans *planner
	log   zerolog.Logger
	tools []string
}

// New builds the server and registers the tools of the allowed groups.
func New(c *api.Client, o Options) (*Server, error) {
	if c == nil {
		return nil, errors.New("mcp: no ferry API client")
	}
	if o.PlanTTL <= 0 {
		o.PlanTTL = DefaultPlanTTL
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Version == "" {
		o.Version = "dev"
	}
	p, err := newPlanner(o.PlanTTL, o.Now)
	if err != nil {
		return nil, err
	}
	s := &Server{c: c, plans: p, log: o.Log.With().Str("component", "mcp").Logger()}
	s.srv = sdk.NewServer(&sdk.Implementation{Name: "ferry", Title: "ferry: move machines and their encrypted volumes between workers", Version: o.Version},
		&sdk.ServerOptions{Instructions: instructions})
	s.register(o.Allow)
	return s, nil
}

const instructions = `ferry moves a machine and its LUKS2-encrypted local volume between workers.
Read tools change nothing. Every change is two calls: a *_plan tool returns exactly what would change and a
plan_token; show the plan to the user, then pass the token to the matching *_apply tool. A token is valid for a
few minutes and once; it is refused if it was altered or if the world changed since the plan (plan again).`

// Tools returns the names of the registered tools.
func (s *Server) Tools() []string { return append([]string(nil), s.tools...) }

// Run serves one session over t until the client leaves or ctx ends.
func (s *Server) Run(ctx context.Context, t sdk.Transport) error { return s.srv.Run(ctx, t) }

// ServeStdio serves one session over newline-delimited JSON-RPC on in and
// out (the process's stdin and stdout for an MCP client that starts it).
func (s *Server) ServeStdio(ctx context.Context, in io.Reader, out io.Writer) error {
	s.log.Info().Str("transport", "stdio").Strs("tools", s.tools).Msg("serving MCP")
	err := s.Run(ctx, &sdk.IOTransport{Reader: io.NopCloser(in), Writer: nopWriteCloser{out}})
	if errors.Is(err, io.EOF) || errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

type nopWriteCloser struct{ io.Writer }

func (nopWriteCloser) Close() error { return nil }

// Handler is the streamable HTTP endpoint (one MCP session per client).
// The SDK refuses requests that reach a loopback listener with a
// non-loopback Host header (DNS rebinding). With a non-empty bearer token
// every request must carry it: loopback is shared by every local user.
func (s *Server) Handler(bearer string) http.Handler {
	h := sdk.NewStreamableHTTPHandler(func(*http.Request) *sdk.Server { return s.srv },
		&sdk.StreamableHTTPOptions{SessionTimeout: 30 * time.Minute})
	if bearer == "" {
		return h
	}
	want := sha256.Sum256([]byte(bearer))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		sum := sha256.Sum256([]byte(got))
		if !ok || subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="ferry mcp"`)
			http.Error(w, "ferry mcp: missing or wrong bearer token (the one in $FERRY_MCP_TOKEN of the serving process)", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// CheckListenAddr refuses an HTTP listen address beyond loopback unless
// allowRemote: whoever reaches the endpoint acts with the caller's
// certificate, and the endpoint has no authentication of its own.
func CheckListenAddr(addr string, allowRemote bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--http %q: want HOST:PORT, e.g. 127.0.0.1:7480: %w", addr, err)
	}
	if allowRemote {
		return nil
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(strings.Trim(host, "[]")); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("--http %s listens beyond loopback, and whoever reaches it acts with your certificate (the endpoint has no authentication of its own): use 127.0.0.1 or [::1], or add --http-allow-remote behind your own authentication", addr)
}

// ServeHTTP serves streamable HTTP on ln until ctx ends (see Handler for bearer).
func (s *Server) ServeHTTP(ctx context.Context, ln net.Listener, bearer string) error {
	hs := &http.Server{Handler: s.Handler(bearer), ReadHeaderTimeout: 10 * time.Second}
	s.log.Info().Str("transport", "http").Str("addr", ln.Addr().String()).Bool("bearer", bearer != "").Strs("tools", s.tools).Msg("serving MCP")
	if bearer == "" {
		s.log.Warn().Msg("no bearer token ($FERRY_MCP_TOKEN): every local user who reaches this port acts with your certificate")
	}
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = hs.Shutdown(sctx)
		case <-done:
		}
	}()
	err := hs.Serve(ln)
	close(done)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// ListenAndServe checks addr (see CheckListenAddr), listens and serves
// streamable HTTP until ctx ends.
func (s *Server) ListenAndServe(ctx context.Context, addr string, allowRemote bool, bearer string) error {
	if err := CheckListenAddr(addr, allowRemote); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", addr, err)
	}
	return s.ServeHTTP(ctx, ln, bearer)
}

// tool registers a typed tool of group g when g is allowed, logging each call.
func tool[In, Out any](s *Server, allow, g Group, t *sdk.Tool, h func(context.Context, In) (Out, error)) {
	if g > allow {
		return
	}
	if t.Annotations == nil {
		t.Annotations = &sdk.ToolAnnotations{}
	}
	apply := strings.HasSuffix(t.Name, "_apply")
	t.Annotations.ReadOnlyHint = !apply // plans change nothing
	// Creating a volume only adds; moving or aborting stops a machine.
	t.Annotations.DestructiveHint = new(apply && t.Name != "volume_create_apply")
	t.Annotations.OpenWorldHint = new(false)
	s.tools = append(s.tools, t.Name)
	name := t.Name
	sdk.AddTool(s.srv, t, func(ctx context.Context, _ *sdk.CallToolRequest, in In) (*sdk.CallToolResult, Out, error) {
		start := time.Now()
		out, err := h(ctx, in)
		ev := s.log.Info()
		if err != nil {
			ev = s.log.Warn().Str("refusal", err.Error())
		}
		ev.Str("tool", name).Dur("took", time.Since(start)).Msg("tool call")
		return nil, out, err
	})
}
