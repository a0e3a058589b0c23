// Package servertest runs in-process ferry server clusters for tests of the
// server and of its users (agent, CLI): certificates in a temporary
// directory, N servers on loopback with short raft timeouts, and clients
// for any identity.
package servertest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/internal/sealing"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server"
)

// Cluster is a set of in-process servers.
type Cluster struct {
	t       testing.TB
	Dir     string
	TLSDir  string
	Servers []*server.Server // nil while stopped
	cfgs    []server.Config
	log     zerolog.Logger
	// Recovery is the private half of the recovery key New registered (as
	// `ferry keys recovery-init` does), nil with Options.NoRecoveryKey.
	Recovery *sealing.PrivateKey
}

// Options tune a cluster; zero values are fine.
type Options struct {
	HeartbeatTimeout  time.Duration // default 400ms
	LeaderLease       time.Duration // default the server's (the heartbeat timeout)
	SnapshotThreshold uint64        // default raft's
	Log               *zerolog.Logger
	ReconcileInterval time.Duration
	DrainBatch        time.Duration // least time between drainer passes (default the server's)
	GCRetention       time.Duration // default the server's
	WriteRate         float64       // per-identity writes/s; default the server's, negative: unlimited
	WriteBurst        int
	NoRecoveryKey     bool // skip registering a recovery key (volumes cannot be created)
}

// New starts n servers (the first bootstraps, the others join) and waits
// until all are voters and the leader knows every API address.
func New(t testing.TB, n int, o Options) *Cluster {
	t.Helper()
	dir := t.TempDir()
	c := &Cluster{t: t, Dir: dir, TLSDir: filepath.Join(dir, "tls"), log: zerolog.Nop()}
	if o.Log != nil {
		c.log = *o.Log
	}
	t.Cleanup(c.Close) // registered first: a failed start still stops what runs
	if o.HeartbeatTimeout == 0 {
		o.HeartbeatTimeout = 400 * time.Millisecond
	}
	certs := map[string]string{"operator": tlsutil.KindOperator}
	for i := 0; i < n; i++ {
		certs[fmt.Sprintf("s%d", i)] = tlsutil.KindServer
	}
	if err := server.EnsureCerts(c.TLSDir, certs); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		cfg := server.Config{
			ID: fmt.Sprintf("s%d", i), DataDir: filepath.Join(dir, fmt.Sprintf("s%d", i)),
			Listen: "127.0.0.1:0", RaftAddr: "127.0.0.1:0", Bootstrap: i == 0, TLSDir: c.TLSDir,
			HeartbeatTimeout: o.HeartbeatTimeout, ElectionTimeout: o.HeartbeatTimeout, LeaderLeaseTimeout: o.LeaderLease,
			SnapshotThreshold: o.SnapshotThreshold, ReconcileInterval: o.ReconcileInterval,
			GCRetention: o.GCRetention, DrainBatch: o.DrainBatch, WriteRate: o.WriteRate, WriteBurst: o.WriteBurst,
		}
		if i > 0 {
			cfg.Join = []string{c.Servers[0].Addr()}
		}
		s, err := server.StartServer(context.Background(), c.log, cfg)
		if err != nil {
			t.Fatalf("starting server %d: %v", i, err)
		}
		// Keep the ports: a restarted server must come back at the same addresses.
		cfg.Listen, cfg.RaftAddr, cfg.Join = s.Addr(), s.RaftAddr(), nil
		c.Servers = append(c.Servers, s)
		c.cfgs = append(c.cfgs, cfg)
		if i == 0 {
			c.WaitLeader(15 * time.Second)
		}
	}
	c.WaitMembers(n, 30*time.Second)
	if !o.NoRecoveryKey {
		k, err := sealing.Generate()
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Client("operator", tlsutil.KindOperator).SetRecoveryKey(context.Background(), k.Public()); err != nil {
			t.Fatalf("registering the recovery key: %v", err)
		}
		c.Recovery = k
	}
	return c
}

// Addrs returns the API addresses of all servers (running or not).
func (c *Cluster) Addrs() []string {
	out := make([]string, len(c.cfgs))
	for i, cfg := range c.cfgs {
		out[i] = cfg.Listen
	}
	return out
}

// Client returns a client presenting certificate name of kind (issued on
// first use), talking to all servers.
func (c *Cluster) Client(name, kind string) *api.Client {
	c.t.Helper()
	if err := server.EnsureCerts(c.TLSDir, map[string]string{name: kind}); err != nil {
		c.t.Fatal(err)
	}
	tc, err := tlsutil.ClientConfig(c.TLSDir, name)
	if err != nil {
		c.t.Fatal(err)
	}
	cl, err := api.NewClient(c.Addrs(), tc)
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(cl.Close)
	return cl
}

// Leader returns the index of the server that is leader now, or -1.
func (c *Cluster) Leader() int {
	for i, s := range c.Servers {
		if s != nil && s.Node().IsLeader() {
			return i
		}
	}
	return -1
}

// WaitLeader waits for a leader and returns its index.
func (c *Cluster) WaitLeader(timeout time.Duration) int {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if i := c.Leader(); i >= 0 {
			return i
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.t.Fatalf("no leader after %s", timeout)
	return -1
}

// WaitMembers waits until the leader sees n voters with published API addresses.
func (c *Cluster) WaitMembers(n int, timeout time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if i := c.Leader(); i >= 0 {
			st := c.Servers[i].Store()
			cf := c.Servers[i].Node().Raft.GetConfiguration()
			if cf.Error() == nil && len(cf.Configuration().Servers) == n && len(st.Servers()) == n {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.t.Fatalf("cluster did not reach %d members in %s", n, timeout)
}

// WaitConverged waits until every running server has applied the same index.
func (c *Cluster) WaitConverged(timeout time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		var idx []uint64
		for _, s := range c.Servers {
			if s != nil {
				idx = append(idx, s.Store().Index())
			}
		}
		same := len(idx) > 0
		for _, x := range idx {
			same = same && x == idx[0]
		}
		if same {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.t.Fatalf("servers did not converge in %s", timeout)
}

// Stop closes server i (its data stays on disk).
func (c *Cluster) Stop(i int) {
	c.t.Helper()
	if c.Servers[i] == nil {
		return
	}
	if err := c.Servers[i].Close(); err != nil {
		c.t.Logf("closing server %d: %v", i, err)
	}
	c.Servers[i] = nil
}

// Restart starts a stopped server i again from its data directory.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	cfg := c.cfgs[i]
	cfg.Bootstrap = false
	var err error
	for attempt := 0; attempt < 50; attempt++ { // the old listener's port may linger briefly
		var s *server.Server
		if s, err = server.StartServer(context.Background(), c.log, cfg); err == nil {
			c.Servers[i] = s
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.t.Fatalf("restarting server %d: %v", i, err)
}

// Close stops every server.
func (c *Cluster) Close() {
	for i := range c.Servers {
		if c.Servers[i] != nil {
			_ = c.Servers[i].Close()
			c.Servers[i] = nil
		}
	}
}

// DataSize returns the bytes on disk under server i's data dir (for reports).
func (c *Cluster) DataSize(i int) int64 {
	var n int64
	_ = filepath.Walk(c.cfgs[i].DataDir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			n += fi.Size()
		}
		return nil
	})
	return n
}
