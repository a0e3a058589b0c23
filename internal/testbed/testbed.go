// Package testbed starts a real ferry cluster on one host: one or more
// servers (a raft cluster) and one agent per worker, each in its own network
// namespace joined by a private IPv6 fabric, talking mTLS. The demo and the integration tests use it; it
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
	"slices"
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
	// Servers is the number of ferry servers, each a raft voter in its own
	// namespace (0 means 1). Agents and Client know every one of them.
	Servers int
	// ServerFailpoints is the FERRY_FAILPOINT_PAUSE_BEFORE every server
	// starts with (e.g. "completed=4s"); SetServerFailpoints changes it.
	ServerFailpoints string
}

// Bed is a running cluster.
type Bed struct {
	cfg    Config
	Fabric netrewrite.Fabric
	Client *api.Client
	// RecoveryKeyFile holds the private recovery key Start made (0600).
	RecoveryKeyFile string
	// ServerAddr is the first server's API address on the fabric.
	ServerAddr string
	// ServerAddrs are every server's API addresses, in ServerIDs order.
	ServerAddrs []string

	mu      sync.Mutex
	procs   map[string]*exec.Cmd // "server/<id>", "agent/<w>"
	hostID  map[string]uint32
	addr    map[string]netip.Addr // by member: worker name or server ID
	servers []string              // server IDs
	// failpoints each server runs with (FERRY_FAILPOINT_PAUSE_BEFORE), by ID
	serverEnv map[string]string
}

// MetricsPort is where each agent serves /metrics inside its namespace.
const MetricsPort = 9410

const (
	serverPort = 7400
	raftPort   = 7401
)

// NSOf is the network namespace of a member: a worker, or a server by its
// ID. "ctl" is the first server's namespace, where the operator's Client
// dials from too.
func (b *Bed) NSOf(name string) string {
	if i := slices.Index(b.servers, name); i >= 0 {
		name = serverMember(i)
	}
	return b.cfg.Prefix + "-" + name
}

// serverMember is the namespace suffix of the i-th server.
func serverMember(i int) string {
	if i == 0 {
		return "ctl"
	}
	return fmt.Sprintf("ctl%d", i)
}

// ServerIDs are the servers' names (raft IDs and certificate names).
func (b *Bed) ServerIDs() []string { return slices.Clone(b.servers) }

// ServerKey is the process key of a server for Kill.
func ServerKey(id string) string { return "server/" + id }

// WorkerDir is a worker agent's data dir.
func (b *Bed) WorkerDir(w string) string { return filepath.Join(b.cfg.Dir, w) }

// HostID of a worker.
func (b *Bed) HostID(w string) uint32 { return b.hostID[w] }

// Addr is a member's fabric address (a worker, a server ID, or "ctl").
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
	if cfg.Servers <= 0 {
		cfg.Servers = 1
	}
	if cfg.Servers > 9 {
		return nil, fmt.Errorf("testbed: %d servers; at most 9", cfg.Servers)
	}
	b = &Bed{cfg: cfg, procs: map[string]*exec.Cmd{}, hostID: map[string]uint32{}, addr: map[string]netip.Addr{}, serverEnv: map[string]string{}}
	defer func() {
		if err != nil {
			b.Close(context.Background())
		}
	}()
	b.Fabric = netrewrite.Fabric{BridgeNS: cfg.Prefix + "-br", Prefix: netip.MustParsePrefix("fd00:fe::/64")}
	for i := 0; i < cfg.Servers; i++ {
		id := fmt.Sprintf("s%d", i)
		a := netip.MustParseAddr(fmt.Sprintf("fd00:fe::%x", 1+i))
		b.servers = append(b.servers, id)
		b.addr[id] = a
		b.Fabric.Members = append(b.Fabric.Members, netrewrite.FabricMember{NS: b.NSOf(id), Addr: a})
		b.ServerAddrs = append(b.ServerAddrs, net.JoinHostPort(a.String(), strconv.Itoa(serverPort)))
		b.serverEnv[id] = cfg.ServerFailpoints
	}
	b.addr["ctl"] = b.addr[b.servers[0]]
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
	certs := []tlsutil.Cert{{Name: "operator", Kind: tlsutil.KindOperator}}
	for _, id := range b.servers {
		certs = append(certs, tlsutil.Cert{Name: id, Kind: tlsutil.KindServer, Hosts: []string{b.addr[id].String()}})
	}
	for _, w := range cfg.Workers {
		certs = append(certs, tlsutil.Cert{Name: w, Kind: tlsutil.KindWorker, Hosts: []string{b.addr[w].String()}})
	}
	if err := tlsutil.EnsureDev(tlsDir, certs...); err != nil {
		return b, err
	}
	b.ServerAddr = b.ServerAddrs[0]
	for _, id := range b.servers {
		if err := b.StartServerID(id); err != nil {
			return b, err
		}
	}
	b.Client, err = b.NewClient(b.ServerAddrs...)
	if err != nil {
		return b, err
	}
	if err := b.waitServers(ctx, 60*time.Second); err != nil {
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
	return b, b.WaitWorkers(ctx, 60*time.Second)
}

// NewClient is an operator client of the given servers, dialing from the
// first server's namespace ("ctl").
func (b *Bed) NewClient(addrs ...string) (*api.Client, error) {
	tc, err := tlsutil.ClientConfig(b.TLSDir(), "operator")
	if err != nil {
		return nil, err
	}
	c, err := api.NewClient(addrs, tc)
	if err != nil {
		return nil, err
	}
	c.SetDialer(b.DialIn("ctl"))
	return c, nil
}

// waitServers waits until every server is a voter of one cluster with a leader.
func (b *Bed) waitServers(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		st, err := b.Client.Status(ctx)
		if err == nil && st.Leader != "" && len(st.Voters) == len(b.servers) {
			return nil
		}
		if err != nil {
			last = err.Error()
		} else {
			last = fmt.Sprintf("leader %q, voters %v", st.Leader, st.Voters)
		}
		if !sleepCtx(ctx, 200*time.Millisecond) {
			return ctx.Err()
		}
	}
	return fmt.Errorf("the %d servers did not form a cluster within %v (last: %s); see the server logs in %s", len(b.servers), timeout, last, b.cfg.Dir)
}

// Leader asks each running server, on its own, for its raft state and
// returns the ID of the one that says it leads; it waits up to timeout for
// one. A server that cannot be reached does not count.
func (b *Bed) Leader(ctx context.Context, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		for i, id := range b.servers {
			if !b.Running(ServerKey(id)) {
				continue
			}
			c, err := b.NewClient(b.ServerAddrs[i])
			if err != nil {
				return "", err
			}
			c.RetryFor = 0
			qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			st, err := c.Status(qctx)
			cancel()
			c.Close()
			if err == nil && st.RaftState == "Leader" {
				return id, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no server says it leads after %v", timeout)
		}
		if !sleepCtx(ctx, 100*time.Millisecond) {
			return "", ctx.Err()
		}
	}
}

// Running reports whether the process under key was started and not killed.
func (b *Bed) Running(key string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.procs[key] != nil
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

// StartServer starts (or restarts) the first server.
func (b *Bed) StartServer() error { return b.StartServerID(b.servers[0]) }

// StartServerID starts (or restarts) a server with the failpoints last set
// by SetServerFailpoints. The first server bootstraps the cluster; the
// others join it on their first start.
func (b *Bed) StartServerID(id string) error {
	i := slices.Index(b.servers, id)
	if i < 0 {
		return fmt.Errorf("testbed: no server %q (have %v)", id, b.servers)
	}
	a := b.addr[id].String()
	dir := filepath.Join(b.cfg.Dir, "server-"+id)
	args := []string{"server", "--name", id, "--data-dir", dir,
		"--listen", net.JoinHostPort(a, strconv.Itoa(serverPort)), "--raft-addr", net.JoinHostPort(a, strconv.Itoa(raftPort)),
		"--tls-dir", b.TLSDir()}
	if _, err := os.Stat(dir); os.IsNotExist(err) {
		if i == 0 {
			args = append(args, "--bootstrap")
		} else {
			args = append(args, "--join", strings.Join(slices.Delete(slices.Clone(b.ServerAddrs), i, i+1), ","))
		}
	}
	b.mu.Lock()
	fp := b.serverEnv[id]
	b.mu.Unlock()
	var env []string
	if fp != "" {
		env = []string{"FERRY_FAILPOINT_PAUSE_BEFORE=" + fp}
	}
	return b.start(ServerKey(id), b.NSOf(id), "server-"+id+".log", env, args...)
}

// SetServerFailpoints sets the FERRY_FAILPOINT_PAUSE_BEFORE every server
// runs with from its next start (see StartServerID), e.g. "completed=4s".
func (b *Bed) SetServerFailpoints(fp string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, id := range b.servers {
		b.serverEnv[id] = fp
	}
}

// ServerFailpoints is what SetServerFailpoints last set.
func (b *Bed) ServerFailpoints() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.serverEnv[b.servers[0]]
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
		"--server", strings.Join(b.ServerAddrs, ","), "--tls-dir", b.TLSDir(), "--data-dir", b.WorkerDir(w),
		"--fast-kdf", "--grace", grace.String(), "--metrics-listen", "127.0.0.1:" + strconv.Itoa(MetricsPort),
		// The bed's workload writes its acknowledgement log outside its
		// volume, in the bed's private folder, which nobody cannot reach.
		"--machine-user", "root"}
	return b.start("agent/"+w, b.NSOf(w), "agent-"+w+".log", env, append(args, b.cfg.AgentArgs...)...)
}

// Signal sends sig to a process (ServerKey(id) or "agent/<w>") and leaves
// it registered: SIGSTOP freezes it (its kernel still accepts connections
// and ACKs their bytes), SIGCONT resumes it.
func (b *Bed) Signal(key string, sig syscall.Signal) error {
	b.mu.Lock()
	cmd := b.procs[key]
	b.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return fmt.Errorf("no process %s to signal", key)
	}
	if err := syscall.Kill(cmd.Process.Pid, sig); err != nil {
		return fmt.Errorf("signal %v to %s: %w", sig, key, err)
	}
	return nil
}

// Kill sends sig to a process (ServerKey(id) or "agent/<w>") and waits for it to end.
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

// WaitWorkers waits until every worker holds a valid lease, e.g. after an
// outage longer than the lease, before the next migration is planned.
func (b *Bed) WaitWorkers(ctx context.Context, timeout time.Duration) error {
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
	for _, id := range b.servers {
		b.Kill(ServerKey(id), syscall.SIGTERM)
	}
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
