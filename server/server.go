package server

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/logging"
	"github.com/ferry-dev/ferry/internal/tlsutil"
)

// Config configures one ferry server (raft voter + HTTP API).
type Config struct {
	ID        string   // server name; with TLSDir, also the certificate name
	DataDir   string   // raft log, snapshots
	Listen    string   // HTTP API listen address, e.g. 127.0.0.1:7400 (":0" picks a port)
	Advertise string   // API address other servers use; defaults to the listener's address
	RaftAddr  string   // raft transport address, e.g. 127.0.0.1:7401
	Bootstrap bool     // start a new cluster (first server only)
	Join      []string // API addresses of servers of an existing cluster

	// TLS: either a directory made by `ferry tls` holding <ID>.pem, or
	// ready configs (tests, embedding).
	TLSDir    string
	ServerTLS *tls.Config
	ClientTLS *tls.Config

	// Raft timing; zero values take DefaultHeartbeatTimeout,
	// DefaultElectionTimeout and a leader lease equal to the heartbeat
	// timeout (raft refuses a longer one).
	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	SnapshotThreshold  uint64

	ReconcileInterval time.Duration // leader housekeeping period (default 1s)
	GCRetention       time.Duration // terminal migrations, ended drains and destroyed volumes are deleted this long after they ended (default 7 days)
	WriteRate         float64       // writes per second per certificate identity (0: DefaultWriteRate; negative: unlimited)
	WriteBurst        int           // burst of those writes (0: DefaultWriteBurst)
	DrainBatch        time.Duration // least time between two passes of the drainer (default 100ms)
	// PauseBefore holds a migration this long in the state it entered
	// before housekeeping proposes ev for it: a failpoint for chaos tests
	// (FERRY_FAILPOINT_PAUSE_BEFORE="completed=4s"), measured from the
	// committed EnteredAt so a new leader keeps holding the same deadline.
	PauseBefore map[fsm.Event]time.Duration
	Now         func() time.Time // clock (default time.Now)
}

// Server is a running ferry server.
type Server struct {
	cfg    Config
	log    zerolog.Logger
	node   *Node
	store  *fsm.Store
	ln     net.Listener
	http   *http.Server
	peers  *http.Client // this server's own requests to other servers (join)
	apiURL string
	reg    *prometheus.Registry
	limits *writeLimits
	ctx    context.Context // ends at Close: releases blocking queries at once
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closed sync.Once

	startLast uint64      // last raft index on disk at start
	ready     atomic.Bool // latched once this replica has caught up
	met       fleetMetrics
	raftMet   raftMetrics
}

// Ready reports whether this server's replica has caught up with the
// cluster since it started (restored its log and knows the commit index), so
// its reads are not older than what it served before a restart. Reads wait
// for it (503 until then; clients retry).
func (s *Server) Ready() bool {
	if s.ready.Load() {
		return true
	}
	r := s.node.Raft
	leader, _ := s.node.Leader()
	commit := r.CommitIndex()
	if leader != "" && r.AppliedIndex() >= commit && (commit >= s.startLast || s.node.IsLeader() && commit > 0) {
		s.ready.Store(true)
		return true
	}
	return false
}

// StartServer opens the data directory, starts raft and serves the API
// until Close (or ctx ends).
func StartServer(ctx context.Context, log zerolog.Logger, cfg Config) (*Server, error) {
	base := log.With().Str("server", cfg.ID).Logger()
	log = logging.For(base, "server")
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.ReconcileInterval <= 0 {
		cfg.ReconcileInterval = time.Second
	}
	if cfg.GCRetention <= 0 {
		cfg.GCRetention = DefaultGCRetention
	}
	if cfg.GCRetention < fsm.MinGCRetention {
		return nil, fmt.Errorf("--gc-retention %s is shorter than %s", cfg.GCRetention, fsm.MinGCRetention)
	}
	if cfg.TLSDir != "" && cfg.ServerTLS == nil {
		st, err := tlsutil.ServerConfig(cfg.TLSDir, cfg.ID)
		if err != nil {
			return nil, err
		}
		ct, err := tlsutil.ClientConfig(cfg.TLSDir, cfg.ID)
		if err != nil {
			return nil, err
		}
		cfg.ServerTLS, cfg.ClientTLS = st, ct
	}
	if cfg.ServerTLS == nil || cfg.ClientTLS == nil {
		return nil, errors.New("server needs TLS: pass --tls-dir holding ca.pem and this server's certificate (`ferry tls csr --role server` here, `ferry tls sign` on the CA host; see docs/security.md)")
	}
	// Every handshake, API and raft alike, is checked against the replicated
	// certificate deny list; the store exists once the node does.
	var denyList atomic.Pointer[fsm.Store]
	revoked := func(serial string) bool {
		st := denyList.Load()
		return st != nil && st.Revoked(serial)
	}
	cfg.ServerTLS = tlsutil.WithDenyList(cfg.ServerTLS, revoked)
	// ... and so are the servers this one dials (raft to its peers,
	// requests forwarded to the leader): a revoked server gets no log.
	cfg.ClientTLS = tlsutil.WithDenyList(cfg.ClientTLS, revoked)
	ln, err := tls.Listen("tcp", cfg.Listen, cfg.ServerTLS)
	if err != nil {
		return nil, fmt.Errorf("listening for the API on %s: %w", cfg.Listen, err)
	}
	adv := cfg.Advertise
	if adv == "" {
		adv = ln.Addr().String()
	}
	if cfg.HeartbeatTimeout <= 0 {
		cfg.HeartbeatTimeout = DefaultHeartbeatTimeout
	}
	if cfg.ElectionTimeout <= 0 {
		cfg.ElectionTimeout = DefaultElectionTimeout
	}
	node, err := NewNode(NodeConfig{
		ID: cfg.ID, DataDir: filepath.Join(cfg.DataDir, "raft"), RaftAddr: cfg.RaftAddr, Bootstrap: cfg.Bootstrap,
		ServerTLS: tlsutil.RequireKind(cfg.ServerTLS, tlsutil.KindServer), ClientTLS: cfg.ClientTLS, // raft: servers only
		HeartbeatTimeout: cfg.HeartbeatTimeout, ElectionTimeout: cfg.ElectionTimeout, LeaderLeaseTimout: leaseFor(cfg.HeartbeatTimeout, cfg.LeaderLeaseTimeout),
		SnapshotThreshold: cfg.SnapshotThreshold, Logger: base,
	})
	if err != nil {
		ln.Close()
		return nil, err
	}
	denyList.Store(node.Store)
	ctx, cancel := context.WithCancel(ctx)
	s := &Server{
		cfg: cfg, log: log, node: node, store: node.Store, ln: ln, apiURL: adv, ctx: ctx, cancel: cancel,
		peers: &http.Client{Transport: &http.Transport{TLSClientConfig: cfg.ClientTLS, MaxIdleConnsPerHost: 16}},
		reg:   prometheus.NewRegistry(), startLast: node.Raft.LastIndex(), limits: newWriteLimits(cfg.WriteRate, cfg.WriteBurst),
	}
	s.reg.MustRegister(&collector{s: s})
	s.met = newFleetMetrics(s.reg)
	s.raftMet = newRaftMetrics(s.reg)
	s.http = &http.Server{
		Handler:           s.denyRevoked(s.routes()),
		ReadHeaderTimeout: 10 * time.Second,
		// A request body is small; a peer trickling it holds a connection.
		ReadTimeout: 30 * time.Second,
		// Blocking queries hold a reply up to maxWait; nothing else is slow.
		WriteTimeout: maxWait + 30*time.Second,
		// An authenticated client that went quiet does not keep its
		// connection (and goroutine) forever.
		IdleTimeout: 2 * time.Minute,
		ErrorLog:    nil,
	}
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		if err := s.http.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error().Err(err).Msg("API server stopped")
		}
	}()
	go func() {
		defer s.wg.Done()
		s.leaderLoop(ctx)
	}()
	if len(cfg.Join) > 0 {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.joinLoop(ctx)
		}()
	}
	log.Info().Str("api", adv).Str("raft", node.RaftAddr()).Bool("bootstrap", cfg.Bootstrap).Msg("ferry server started")
	return s, nil
}

// Raft timeouts of a server whose Config leaves them zero. With raft's own
// (1 s, lease 500 ms) a takeover after the leader dies took 1.66 s (median
// of 9, 3-node cluster, BenchmarkLeaderTakeover); at 500 ms with the lease
// equal to it, 0.86 s (max 1.24 s). Under load (32 proposals in flight, CPU
// burners, a host at load average 40-70 on 2 cores) raft's defaults elected
// twice in 45 s, these never (BenchmarkElectionsUnderLoad): the short lease,
// not the heartbeat timeout, made the leader step down.
//
// A takeover is about the later of the two followers' timeouts, each drawn
// in [HT, 2HT) after the leader's last contact: a follower that still knows
// a leader refuses to vote, so the first to time out waits for the second
// (about 1.67 HT). At 400 ms the suite's takeover fell to 0.69-0.84 s, but
// the loaded CI host then failed two chaos cases (a leader restart's
// admission found the source's lease not yet renewed with the new leader;
// a soak migration met "no leader"): 500 ms stays.
const (
	DefaultHeartbeatTimeout = 500 * time.Millisecond
	DefaultElectionTimeout  = 500 * time.Millisecond
)

// leaseFor is the leader lease: lease when set, else the heartbeat timeout.
// raft's default is half of it, which on a loaded host makes the leader step
// down whenever its heartbeats' answers are late by a quarter second.
func leaseFor(hb, lease time.Duration) time.Duration {
	if lease > 0 {
		return lease
	}
	return hb
}

// Addr is the API address (host:port) this server listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// RaftAddr is this server's raft transport address.
func (s *Server) RaftAddr() string { return s.node.RaftAddr() }

// Node exposes the raft node (tests, benchmarks).
func (s *Server) Node() *Node { return s.node }

// Store exposes the replicated state for reading.
func (s *Server) Store() *fsm.Store { return s.store }

// Close stops the API and raft. It is safe to call more than once.
func (s *Server) Close() error {
	var err error
	s.closed.Do(func() {
		s.cancel()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = s.http.Shutdown(ctx)
		_ = s.http.Close()
		s.wg.Wait()
		err = s.node.Close()
		s.peers.CloseIdleConnections()
		s.log.Info().Msg("ferry server stopped")
	})
	return err
}

// joinLoop asks the cluster to add this server until it is a voter. A
// follower answers with the leader's address, which is asked next.
func (s *Server) joinLoop(ctx context.Context) {
	req := api.JoinRequest{ID: s.cfg.ID, RaftAddr: s.node.RaftAddr(), APIAddr: s.apiURL}
	delay := 200 * time.Millisecond
	for {
		for _, addr := range s.cfg.Join {
			for hop := 0; hop < 3 && addr != ""; hop++ {
				leader, err := s.post(ctx, addr, "/v1/internal/join", req, nil)
				if err == nil {
					s.log.Info().Str("via", addr).Msg("joined the cluster")
					return
				}
				s.log.Warn().Err(err).Str("via", addr).Str("leader", leader).Msg("join failed; retrying")
				addr = leader
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		if delay < 5*time.Second {
			delay *= 2
		}
	}
}

// post sends this server's own JSON request to another server (mTLS,
// server certificate); leader is the redirect a follower answered with.
func (s *Server) post(ctx context.Context, addr, path string, in, out any) (leader string, err error) {
	b, err := json.Marshal(in)
	if err != nil {
		return "", err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+addr+path, bytes.NewReader(b))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.peers.Do(req)
	if err != nil {
		return "", fmt.Errorf("%w: %v", api.ErrUnavailable, err)
	}
	defer resp.Body.Close()
	return resp.Header.Get(api.LeaderHeader), api.DecodeReply(resp, out)
}

// submit authorizes one command against the current records and
// replicates it; only the leader does either. A follower refuses with the
// leader's API address (LeaderHeader) so the caller sends the write there
// over its own connection: no server ever speaks for another identity, and
// a refused command never reaches the log.
func (s *Server) submit(ctx context.Context, typ fsm.CommandType, payload any) (*fsm.Result, error) {
	if !s.node.IsLeader() {
		return nil, s.notLeader()
	}
	if ref := s.store.Authorize(payload); ref != nil {
		return &fsm.Result{Refusal: ref}, nil
	}
	b, err := fsm.Encode(typ, payload)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	res, err := s.node.Apply(b, 10*time.Second)
	if err != nil {
		s.raftMet.failed.Inc()
	}
	if errors.Is(err, ErrNotLeader) {
		return nil, s.notLeader()
	}
	if err != nil {
		return nil, err
	}
	s.raftMet.observeApply(start)
	return res, nil
}

// notLeaderError is a not_leader refusal with the leader's API address,
// when known, for the reply's LeaderHeader.
type notLeaderError struct {
	*fsm.Refusal
	leaderAPI string
}

func (e *notLeaderError) Unwrap() error { return e.Refusal }

func (s *Server) notLeader() error {
	leaderID, _ := s.node.Leader()
	switch {
	case leaderID == "":
		return &notLeaderError{Refusal: &fsm.Refusal{Kind: fsm.RefuseNotLeader, Code: fsm.CodeNoLeader, Reason: "the cluster has no leader right now; retry shortly"}}
	case leaderID == s.cfg.ID:
		return &notLeaderError{Refusal: &fsm.Refusal{Kind: fsm.RefuseNotLeader, Code: fsm.CodeNoLeader, Reason: "leadership is changing; retry shortly"}}
	}
	for _, m := range s.store.Servers() {
		if m.ID == leaderID && m.APIAddr != "" {
			return &notLeaderError{leaderAPI: m.APIAddr, Refusal: &fsm.Refusal{Kind: fsm.RefuseNotLeader, Code: fsm.CodeNoLeader,
				Reason: "this server is not the leader: send writes to " + leaderID + " at " + m.APIAddr}}
		}
	}
	return &notLeaderError{Refusal: &fsm.Refusal{Kind: fsm.RefuseNotLeader, Code: fsm.CodeNoLeader,
		Reason: "the leader " + leaderID + " has not published its API address yet; retry shortly"}}
}

// waitApplied waits (bounded) until this replica applied index.
func (s *Server) waitApplied(ctx context.Context, index uint64, max time.Duration) {
	t := time.NewTimer(max)
	defer t.Stop()
	for {
		ch := s.store.Changed()
		if s.store.Index() >= index {
			return
		}
		select {
		case <-ch:
		case <-t.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// header builds the command header for a request's identity.
func (s *Server) header(id fsm.Identity) fsm.Header {
	return fsm.Header{Actor: id, Now: s.cfg.Now().UTC()}
}

func (s *Server) status() api.StatusReply {
	leaderID, _ := s.node.Leader()
	r := api.StatusReply{ID: s.cfg.ID, RaftState: s.node.Raft.State().String(), Leader: leaderID, Index: s.store.Index(), Ready: s.Ready(), Servers: s.store.Servers()}
	for _, m := range r.Servers {
		if m.ID == leaderID {
			r.LeaderAPI = m.APIAddr
		}
	}
	if f := s.node.Raft.GetConfiguration(); f.Error() == nil {
		for _, sv := range f.Configuration().Servers {
			if sv.Suffrage == raft.Voter {
				r.Voters = append(r.Voters, string(sv.ID))
			}
		}
	}
	return r
}
