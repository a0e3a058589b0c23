// Package testbed starts a real ferry cluster on one host: a server and one
// agent per worker, each in its own network namespace joined by a private
// IPv6 fabric, talking mTLS. The demo and the integration tests use it; it
// tears down everything it made, even after a failure.
package testbed

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/internal/operator"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/netrewrite"
)

// Config of a test bed.
type Config struct {
	Dir     string   // work dir (created); everything lives under it
	Exe     string   // the ferry binary
	Prefix  string   // namespace name prefix, short and unique (e.g. "fd3a")
	Workers []string // worker names
	Grace   time.Duration
	Log     zerolog.Logger
	// AgentArgs are appended to every agent's command line (e.g. --lease-ttl 3s).
	AgentArgs []string
}

// Bed is a running cluster.
type Bed struct {
	cfg    Config
	Fabric netrewrite.Fabric
	Client *api.Client
	// RecoveryKeyFile holds the private recovery key Start made (0600).
	RecoveryKeyFile string
	// ServerAddr is the server's API address on the fabric.
	ServerAddr string

	mu     sync.Mutex
	procs  map[string]*exec.Cmd // "server", "agent/<w>"
	hostID map[string]uint32
	addr   map[string]netip.Addr
}

// MetricsPort is where each agent serves /metrics inside its namespace.
const MetricsPort = 9410

const (
	serverPort = 7400
	raftPort   = 7401
)

// NSOf is the network namespace of a worker ("ctl" for the server).
func (b *Bed) NSOf(name string) string { return b.cfg.Prefix + "-" + name }

// WorkerDir is a worker agent's data dir.
func (b *Bed) WorkerDir(w string) string { return filepath.Join(b.cfg.Dir, w) }

// HostID of a worker.
func (b *Bed) HostID(w string) uint32 { return b.hostID[w] }

// Addr is a worker's fabric address.
func (b *Bed) Addr(w string) netip.Addr { return b.addr[w] }

// Start builds the fabric, certificates, server and agents.
func Start(ctx context.Context, cfg Config) (b *Bed, err error) {
	if len(cfg.Prefix) == 0 || len(cfg.Prefix) > 6 {
		return nil, fmt.Errorf("testbed prefix %q: 1 to 6 characters", cfg.Prefix)
	}
	if err := netrewrite.CheckPrivileges(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, err
	}
	b = &Bed{cfg: cfg, procs: map[string]*exec.Cmd{}, hostID: map[string]uint32{}, addr: map[string]netip.Addr{}}
	defer func() {
		if err != nil {
			b.Close(context.Background())
		}
	}()
	b.Fabric = netrewrite.Fabric{BridgeNS: cfg.Prefix + "-br", Prefix: netip.MustParsePrefix("fd00:fe::/64")}
	ctlAddr := netip.MustParseAddr("fd00:fe::1")
	b.addr["ctl"] = ctlAddr
	b.Fabric.Members = append(b.Fabric.Members, netrewrite.FabricMember{NS: b.NSOf("ctl"), Addr: ctlAddr})
	for i, w := range cfg.Workers {
		a := netip.MustParseAddr(fmt.Sprintf("fd00:fe::%x", 0x10+i))
		b.hostID[w] = uint32(i + 1)
		b.addr[w] = a
		b.Fabric.Members = append(b.Fabric.Members, netrewrite.FabricMember{NS: b.NSOf(w), HostID: uint32(i + 1), Addr: a})
	}
	if err := b.Fabric.Connect(ctx, cfg.Log); err != nil {
		return b, err
	}
	tlsDir := b.TLSDir()
	// The CA stays next to tlsDir (tlsutil.DevCADir), never in it.
	certs := []tlsutil.Cert{{Name: "server", Kind: tlsutil.KindServer, Hosts: []string{ctlAddr.String()}}, {Name: "operator", Kind: tlsutil.KindOperator}}
	for _, w := range cfg.Workers {
		certs = append(certs, tlsutil.Cert{Name: w, Kind: tlsutil.KindWorker, Hosts: []string{b.addr[w].String()}})
	}
	if err := tlsutil.EnsureDev(tlsDir, certs...); err != nil {
		return b, err
	}
	b.ServerAddr = net.JoinHostPort(ctlAddr.String(), strconv.Itoa(serverPort))
	if err := b.StartServer(); err != nil {
		return b, err
	}
	tc, err := tlsutil.ClientConfig(tlsDir, "operator")
	if err != nil {
		return b, err
	}
	b.Client, err = api.NewClient([]string{b.ServerAddr}, tc)
	if err != nil {
		return b, err
	}
	b.Client.SetDialer(b.DialIn("ctl"))
	// As an operator runs `ferry keys recovery-init` once: no volume key
	// can be committed without a recovery envelope.
	b.RecoveryKeyFile = filepath.Join(cfg.Dir, "recovery.key")
	if _, err := os.Stat(b.RecoveryKeyFile); os.IsNotExist(err) {
		if _, err := operator.RecoveryInit(ctx, b.Client, b.RecoveryKeyFile); err != nil {
			return b, fmt.Errorf("recovery-init: %w", err)
		}
	}
	for _, w := range cfg.Workers {
		if err := b.StartAgent(w); err != nil {
			return b, err
		}
	}
	return b, b.waitWorkers(ctx, 60*time.Second)
}

// TLSDir holds the cluster's CA and certificates.
func (b *Bed) TLSDir() string { return filepath.Join(b.cfg.Dir, "tls") }

// DialIn returns a dialer that opens connections from inside member's namespace.
func (b *Bed) DialIn(member string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	ns := b.NSOf(member)
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		var derr error
		if err := netrewrite.RunInNS(ns, func() error {
			c, derr = (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
			return nil
		}); err != nil {
			return nil, err
		}
		return c, derr
	}
}

func (b *Bed) start(key, ns, logName string, env []string, args ...string) error {
	logf, err := os.OpenFile(filepath.Join(b.cfg.Dir, logName), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns, "--", b.cfg.Exe}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), env...)
	// Own process group: a terminal's Ctrl-C reaches the orchestrator only,
	// which then shuts things down in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", key, err)
	}
	b.mu.Lock()
	b.procs[key] = cmd
	b.mu.Unlock()
	go cmd.Wait()
	return nil
}

// StartServer starts (or restarts) the one-node server.
func (b *Bed) StartServer() error {
	ctl := b.addr["ctl"].String()
	args := []string{"server", "--name", "server", "--data-dir", filepath.Join(b.cfg.Dir, "server"),
		"--listen", net.JoinHostPort(ctl, strconv.Itoa(serverPort)), "--raft-addr", net.JoinHostPort(ctl, strconv.Itoa(raftPort)),
		"--tls-dir", b.TLSDir()}
	if _, err := os.Stat(filepath.Join(b.cfg.Dir, "server")); os.IsNotExist(err) {
		args = append(args, "--bootstrap")
	}
	return b.start("server", b.NSOf("ctl"), "server.log", nil, args...)
}

// StartAgent starts (or restarts) a worker's agent.
func (b *Bed) StartAgent(w string) error { return b.StartAgentEnv(w, nil) }

// StartAgentEnv starts a worker's agent with extra environment (failpoints).
func (b *Bed) StartAgentEnv(w string, env []string) error {
	grace := b.cfg.Grace
	if grace == 0 {
		grace = time.Minute
	}
	args := []string{"agent", "--worker", w,
		"--host-id", strconv.FormatUint(uint64(b.hostID[w]), 10), "--address", b.addr[w].String(),
		"--server", b.ServerAddr, "--tls-dir", b.TLSDir(), "--data-dir", b.WorkerDir(w),
		"--fast-kdf", "--grace", grace.String(), "--metrics-listen", "127.0.0.1:" + strconv.Itoa(MetricsPort),
		// The bed's workload writes its acknowledgement log outside its
		// volume, in the bed's private folder, which nobody cannot reach.
		"--machine-user", "root"}
	return b.start("agent/"+w, b.NSOf(w), "agent-"+w+".log", env, append(args, b.cfg.AgentArgs...)...)
}

// Kill sends sig to a process ("server" or "agent/<w>") and waits for it to end.
func (b *Bed) Kill(key string, sig syscall.Signal) error {
	b.mu.Lock()
	cmd := b.procs[key]
	delete(b.procs, key)
	b.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return nil
	}
	// nsenter execs the agent in place, so the pid is the agent's.
	_ = syscall.Kill(cmd.Process.Pid, sig)
	for i := 0; i < 300; i++ {
		if syscall.Kill(cmd.Process.Pid, 0) != nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = syscall.Kill(cmd.Process.Pid, syscall.SIGKILL)
	time.Sleep(100 * time.Millisecond)
	return nil
}

func (b *Bed) waitWorkers(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		ws, err := b.Client.ListWorkers(ctx)
		lastErr = err
		if err == nil {
			seen := map[string]bool{}
			for _, w := range ws {
				if w.Alive(time.Now()) {
					seen[w.Name] = true
				}
			}
			all := true
			for _, w := range b.cfg.Workers {
				all = all && seen[w]
			}
			if all {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("workers did not register within %v (last error: %v); see the logs in %s", timeout, lastErr, b.cfg.Dir)
}

// Close stops the agents and the server, then tears down everything the
// workers run (machines, mounts, loop devices, datapaths, exports, machine
// namespaces) and the fabric. Safe to call twice.
func (b *Bed) Close(ctx context.Context) error {
	var errs []error
	for _, w := range b.cfg.Workers {
		b.Kill("agent/"+w, syscall.SIGTERM)
	}
	b.Kill("server", syscall.SIGTERM)
	for _, w := range b.cfg.Workers {
		if _, err := os.Stat(b.WorkerDir(w)); err != nil {
			continue
		}
		ns := b.NSOf(w)
		if !netrewrite.NamespaceExists(ns) {
			ns = ""
		}
		args := []string{"agent", "cleanup", "--worker", w, "--data-dir", b.WorkerDir(w), "--tls-dir", b.TLSDir(), "--log-level", "warn"}
		var cmd *exec.Cmd
		if ns != "" {
			cmd = exec.CommandContext(ctx, "nsenter", append([]string{"--net=/run/netns/" + ns, "--", b.cfg.Exe}, args...)...)
		} else {
			cmd = exec.CommandContext(ctx, b.cfg.Exe, args...)
		}
		// Its own process group: a second Ctrl-C on the terminal must not cut the cleanup short.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if out, err := cmd.CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("cleanup of %s: %w: %s", w, err, strings.TrimSpace(string(out))))
		}
	}
	if b.Client != nil {
		b.Client.Close()
	}
	if err := b.Fabric.Teardown(ctx, b.cfg.Log); err != nil {
		errs = append(errs, err)
	}
	for _, m := range b.Fabric.Members {
		if netrewrite.NamespaceExists(m.NS) {
			errs = append(errs, netrewrite.DeleteNamespace(m.NS))
		}
	}
	// Machine namespaces are named fm-<worker>-<machine>.
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			for _, w := range b.cfg.Workers {
				if strings.HasPrefix(e.Name(), "fm-"+w+"-") {
					errs = append(errs, netrewrite.DeleteNamespace(e.Name()))
				}
			}
		}
	}
	return errors.Join(errs...)
}
