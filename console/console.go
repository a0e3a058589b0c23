// Package console is `ferry ui`: a local web console for on-call engineers.
// It talks to the servers with the operator's own certificate (like kubectl
// proxy), so it listens on loopback only unless told otherwise, and it guards
// every page against DNS rebinding (Host check) and every POST against
// cross-site requests (token and Origin check): anyone who can make the
// browser send a request here acts with that certificate.
//
// Pages are rendered on the server with html/template; the only script feeds
// the live parts from server-sent events, which the console fills from the
// servers' blocking queries.
package console

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"embed"
	"encoding/base64"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// DefaultListen is where the console listens unless told otherwise.
const DefaultListen = "127.0.0.1:7480"

// Config is what the console needs: the servers and the operator's TLS
// configuration (its client certificate).
type Config struct {
	Servers []string    // server API addresses (host:port)
	TLS     *tls.Config // presents the operator certificate
	Log     zerolog.Logger
	// Hosts the console answers to besides loopback names and the listen
	// address; requests naming any other Host are refused (DNS rebinding).
	ExtraHosts []string
	// Dial, when set, opens the connections to the servers (e.g. from
	// inside the network namespace they live in); nil dials directly.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Console serves the pages. Build it with New, serve Handler on a listener
// from Listen.
type Console struct {
	cfg    Config
	log    zerolog.Logger
	client *api.Client
	tmpl   *template.Template
	token  string // CSRF token of this process

	mu      sync.Mutex
	members map[string]*api.Client // per-server clients, by API address
}

// New checks the configuration and builds the console's client.
func New(cfg Config) (*Console, error) {
	if cfg.TLS == nil {
		return nil, errors.New("the console needs the operator's TLS configuration (--tls-dir, --cert)")
	}
	c, err := api.NewClient(cfg.Servers, cfg.TLS)
	if err != nil {
		return nil, fmt.Errorf("console client: %w", err)
	}
	if cfg.Dial != nil {
		c.SetDialer(cfg.Dial)
	}
	// A page must not hang for the client's default 30 s when no server
	// answers; the next refresh or event tries again.
	c.RetryFor = 5 * time.Second
	tmpl, err := parseTemplates()
	if err != nil {
		return nil, err
	}
	tok := make([]byte, 32)
	if _, err := rand.Read(tok); err != nil {
		return nil, fmt.Errorf("CSRF token: %w", err)
	}
	return &Console{cfg: cfg, log: cfg.Log, client: c, tmpl: tmpl, token: base64.RawURLEncoding.EncodeToString(tok),
		members: map[string]*api.Client{}}, nil
}

// Close releases the console's connections.
func (c *Console) Close() {
	c.client.Close()
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, m := range c.members {
		m.Close()
	}
}

// member returns a client that talks to one server only, to ask each for its
// own raft state.
func (c *Console) member(addr string) (*api.Client, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if m, ok := c.members[addr]; ok {
		return m, nil
	}
	m, err := api.NewClient([]string{addr}, c.cfg.TLS)
	if err != nil {
		return nil, err
	}
	if c.cfg.Dial != nil {
		m.SetDialer(c.cfg.Dial)
	}
	m.RetryFor = time.Second
	c.members[addr] = m
	return m, nil
}

// Handler is the console's HTTP handler with its guards.
func (c *Console) Handler(listen net.Addr) http.Handler {
	mux := http.NewServeMux()
	static, _ := fs.Sub(staticFS, "static")
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(static)))
	mux.HandleFunc("GET /{$}", c.fleetPage)
	mux.HandleFunc("GET /migrations/{id}", c.migrationPage)
	mux.HandleFunc("GET /migrations/{id}/abort", c.abortPlanPage)
	mux.HandleFunc("POST /migrations/{id}/abort", c.abortApply)
	mux.HandleFunc("GET /volumes/{id}", c.volumePage)
	mux.HandleFunc("GET /workers/{name}/drain", c.drainPlanPage)
	mux.HandleFunc("POST /workers/{name}/drain", c.drainApply)
	mux.HandleFunc("GET /events/workers/{name}/migrations", c.drainEvents)
	mux.HandleFunc("GET /events/migrations", c.migrationsEvents)
	mux.HandleFunc("GET /events/migrations/{id}", c.migrationEvents)
	return guard(mux, allowedHosts(listen, c.cfg.ExtraHosts), c.token)
}

// Listen opens the console's listener. A non-loopback address is refused
// unless allowNonLoopback: the console acts with the operator's certificate
// for anyone who reaches it. When the process was started with a socket
// passed in (systemd socket activation: LISTEN_PID, LISTEN_FDS), that socket
// is used instead of addr, under the same check.
func Listen(addr string, allowNonLoopback bool) (net.Listener, error) {
	ln, err := inherited()
	if err != nil {
		return nil, err
	}
	if ln == nil {
		if err := CheckListen(addr, allowNonLoopback); err != nil {
			return nil, err
		}
		if ln, err = net.Listen("tcp", addr); err != nil {
			return nil, fmt.Errorf("console listen on %s: %w", addr, err)
		}
	}
	if err := CheckListen(ln.Addr().String(), allowNonLoopback); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// inherited returns the first socket passed by systemd-style socket
// activation, or nil when there is none for this process.
func inherited() (net.Listener, error) {
	pid, err := strconv.Atoi(os.Getenv("LISTEN_PID"))
	if err != nil || pid != os.Getpid() {
		return nil, nil
	}
	if n, err := strconv.Atoi(os.Getenv("LISTEN_FDS")); err != nil || n < 1 {
		return nil, nil
	}
	f := os.NewFile(3, "listen-fd-3")
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("the passed socket (LISTEN_FDS) is not a listening socket: %w", err)
	}
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	return ln, nil
}

// CheckListen refuses an address that is not on loopback (an IP literal or
// "localhost") unless allowNonLoopback.
func CheckListen(addr string, allowNonLoopback bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("listen address %q: %w (use host:port, e.g. %s)", addr, err, DefaultListen)
	}
	if allowNonLoopback {
		return nil
	}
	if host == "localhost" {
		return nil
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("listen address %q is not loopback: the console acts with the operator's certificate for anyone who reaches it; "+
		"listen on 127.0.0.1 or [::1] and tunnel to it, or pass --allow-non-loopback if the network is trusted", addr)
}

// Serve serves the console on ln until ctx ends.
func (c *Console) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{Handler: c.Handler(ln.Addr()), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
		_ = srv.Close() // event streams do not end by themselves
	}()
	c.log.Info().Str("url", "http://"+ln.Addr().String()+"/").Msg("console listening")
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("console: %w", err)
	}
	return nil
}
