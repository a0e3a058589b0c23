package server

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/logging"
)

// NodeConfig configures one raft voter.
type NodeConfig struct {
	ID        string // unique server name
	DataDir   string // raft.db (log + stable store) and snapshots/
	RaftAddr  string // listen address of the raft transport, e.g. 127.0.0.1:7001
	Bootstrap bool   // form a new one-voter cluster if DataDir holds no state

	// ServerTLS and ClientTLS secure the raft transport (mTLS between
	// servers). Both nil means plain TCP, for unit tests only.
	ServerTLS *tls.Config
	ClientTLS *tls.Config

	// Timing; zero values take production defaults. Tests shorten them.
	HeartbeatTimeout  time.Duration
	ElectionTimeout   time.Duration
	LeaderLeaseTimout time.Duration
	SnapshotThreshold uint64
	SnapshotInterval  time.Duration

	Logger zerolog.Logger
}

// Node is a raft voter applying commands to a Store.
type Node struct {
	Store *fsm.Store
	Raft  *raft.Raft
	id    string
	log   zerolog.Logger
	trans *raft.NetworkTransport
	bolt  *raftboltdb.BoltStore
	logs  *shredStore
	purge chan struct{} // a volume was destroyed: snapshot and compact
	done  chan struct{}
	stop  sync.Once
}

// ErrNotLeader says this node cannot apply; the caller redirects the writer to the leader or retries.
var ErrNotLeader = errors.New("this server is not the raft leader")

// NewNode opens (or creates) the node's durable state and starts raft.
func NewNode(cfg NodeConfig) (*Node, error) {
	log := logging.For(cfg.Logger, "raft").With().Str("node", cfg.ID).Logger()
	if cfg.ID == "" || cfg.DataDir == "" || cfg.RaftAddr == "" {
		return nil, errors.New("raft node needs an id, a data directory and a raft address")
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating data dir %s: %w", cfg.DataDir, err)
	}
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.Logger = hclogFor(log)
	if cfg.HeartbeatTimeout > 0 {
		rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	}
	if cfg.ElectionTimeout > 0 {
		rc.ElectionTimeout = cfg.ElectionTimeout
	}
	if cfg.LeaderLeaseTimout > 0 {
		rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimout
	}
	if cfg.SnapshotThreshold > 0 {
		rc.SnapshotThreshold = cfg.SnapshotThreshold
		rc.TrailingLogs = cfg.SnapshotThreshold
	}
	if cfg.SnapshotInterval > 0 {
		rc.SnapshotInterval = cfg.SnapshotInterval
	}
	bolt, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(cfg.DataDir, "raft.db")})
	if err != nil {
		return nil, fmt.Errorf("opening raft log %s: %w (is another ferry server using this data dir?)", filepath.Join(cfg.DataDir, "raft.db"), err)
	}
	// One snapshot is retained: an older one would keep the envelopes of
	// destroyed volumes on disk after the purge snapshot replaced it. A
	// snapshot is complete on disk before the previous one is removed.
	snaps, err := raft.NewFileSnapshotStoreWithLogger(cfg.DataDir, 1, rc.Logger)
	if err != nil {
		bolt.Close()
		return nil, fmt.Errorf("opening snapshots in %s: %w", cfg.DataDir, err)
	}
	logs, err := openShredStore(bolt, filepath.Join(cfg.DataDir, "logkeys.json"))
	if err != nil {
		bolt.Close()
		return nil, err
	}
	stream, err := newStreamLayer(cfg.RaftAddr, cfg.ServerTLS, cfg.ClientTLS)
	if err != nil {
		bolt.Close()
		return nil, err
	}
	trans := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream: stream, MaxPool: 3, Timeout: 10 * time.Second, Logger: rc.Logger,
	})
	store := fsm.NewStore(cfg.Logger)
	existing, err := raft.HasExistingState(logs, bolt, snaps)
	if err != nil {
		trans.Close()
		bolt.Close()
		return nil, fmt.Errorf("reading raft state: %w", err)
	}
	if cfg.Bootstrap && !existing {
		conf := raft.Configuration{Servers: []raft.Server{{ID: rc.LocalID, Address: trans.LocalAddr()}}}
		if err := raft.BootstrapCluster(rc, logs, bolt, snaps, trans, conf); err != nil {
			trans.Close()
			bolt.Close()
			return nil, fmt.Errorf("bootstrapping cluster: %w", err)
		}
		log.Info().Str("addr", string(trans.LocalAddr())).Msg("bootstrapped a new cluster")
	}
	purge := make(chan struct{}, 1)
	r, err := raft.NewRaft(rc, raftFSM{s: store, purge: purge}, logs, bolt, snaps, trans)
	if err != nil {
		trans.Close()
		bolt.Close()
		return nil, fmt.Errorf("starting raft: %w", err)
	}
	n := &Node{Store: store, Raft: r, id: cfg.ID, log: log, trans: trans, bolt: bolt, logs: logs, purge: purge, done: make(chan struct{})}
	go n.purgeLoop()
	return n, nil
}

// purgeLoop snapshots and compacts the log after a volume is destroyed,
// on every server, so the destroyed volume's envelopes leave the log and
// the snapshots instead of staying until the next routine snapshot.
func (n *Node) purgeLoop() {
	for {
		select {
		case <-n.done:
			return
		case <-n.purge:
		}
		if err := n.Purge(); err != nil {
			n.log.Warn().Err(err).Msg("snapshot after a volume was destroyed failed; the next routine snapshot compacts the log")
		}
	}
}

// Purge starts a new log key epoch, takes a snapshot and compacts the
// whole log up to it (no trailing entries kept: followers that lag catch
// up from the snapshot); the compacted entries' key is then destroyed.
func (n *Node) Purge() error {
	if err := n.logs.Rotate(); err != nil {
		return fmt.Errorf("rotating the log key: %w", err)
	}
	rc := n.Raft.ReloadableConfig()
	keep := rc.TrailingLogs
	rc.TrailingLogs = 0
	if err := n.Raft.ReloadConfig(rc); err != nil {
		return fmt.Errorf("lowering trailing logs: %w", err)
	}
	defer func() {
		rc.TrailingLogs = keep
		if err := n.Raft.ReloadConfig(rc); err != nil {
			n.log.Warn().Err(err).Msg("restoring trailing logs after a purge")
		}
	}()
	if err := n.Raft.Snapshot().Error(); err != nil && !errors.Is(err, raft.ErrNothingNewToSnapshot) {
		return fmt.Errorf("snapshot: %w", err)
	}
	n.log.Info().Msg("log compacted after a volume was destroyed")
	return nil
}

// ID is the node's server ID.
func (n *Node) ID() string { return n.id }

// RaftAddr is the address peers reach this node's transport at.
func (n *Node) RaftAddr() string { return string(n.trans.LocalAddr()) }

// IsLeader reports whether this node is the leader now.
func (n *Node) IsLeader() bool { return n.Raft.State() == raft.Leader }

// Leader returns the current leader's ID and raft address ("" when unknown).
func (n *Node) Leader() (id, addr string) {
	a, i := n.Raft.LeaderWithID()
	return string(i), string(a)
}

// Apply replicates an encoded command and returns what the store did. On a
// follower, or when leadership is lost mid-way, it returns an error wrapping
// ErrNotLeader: the caller retries (with the same step ID) elsewhere.
func (n *Node) Apply(cmd []byte, timeout time.Duration) (*fsm.Result, error) {
	f := n.Raft.Apply(cmd, timeout)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) ||
			errors.Is(err, raft.ErrLeadershipTransferInProgress) || errors.Is(err, raft.ErrRaftShutdown) {
			return nil, fmt.Errorf("%w: %v", ErrNotLeader, err)
		}
		return nil, fmt.Errorf("replicating command: %w", err)
	}
	res, ok := f.Response().(*fsm.Result)
	if !ok {
		return nil, fmt.Errorf("replicating command: unexpected apply response %T", f.Response())
	}
	return res, nil
}

// AddVoter adds a server to the cluster (leader only).
func (n *Node) AddVoter(id, addr string, timeout time.Duration) error {
	cf := n.Raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		return fmt.Errorf("reading cluster configuration: %w", err)
	}
	for _, s := range cf.Configuration().Servers {
		if string(s.ID) == id && string(s.Address) == addr {
			return nil
		}
	}
	if err := n.Raft.AddVoter(raft.ServerID(id), raft.ServerAddress(addr), 0, timeout).Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) {
			return fmt.Errorf("%w: %v", ErrNotLeader, err)
		}
		return fmt.Errorf("adding voter %s at %s: %w", id, addr, err)
	}
	n.log.Info().Str("voter", id).Str("addr", addr).Msg("added voter")
	return nil
}

// RemoveServer removes a voter from the cluster (leader only).
func (n *Node) RemoveServer(id string, timeout time.Duration) error {
	if err := n.Raft.RemoveServer(raft.ServerID(id), 0, timeout).Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) {
			return fmt.Errorf("%w: %v", ErrNotLeader, err)
		}
		return fmt.Errorf("removing server %s: %w", id, err)
	}
	n.log.Info().Str("server", id).Msg("removed server")
	return nil
}

// WaitLeader waits until some node is leader (as this node sees it).
func (n *Node) WaitLeader(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if id, _ := n.Leader(); id != "" {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("no raft leader after %s", timeout)
}

// raftFSM adapts the store, which knows nothing of raft, to raft.FSM.
type raftFSM struct {
	s     *fsm.Store
	purge chan<- struct{}
}

func (f raftFSM) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	res := f.s.ApplyCommand(l.Index, l.Data)
	if res.Refusal == nil && res.Volume != nil && res.Volume.State == fsm.VolDestroyed {
		select {
		case f.purge <- struct{}{}:
		default: // a purge is already pending
		}
	}
	return res
}

func (f raftFSM) Snapshot() (raft.FSMSnapshot, error) {
	sn, err := f.s.Snapshot()
	if err != nil {
		return nil, err
	}
	return raftSnapshot{sn}, nil
}

func (f raftFSM) Restore(rc io.ReadCloser) error { return f.s.Restore(rc) }

type raftSnapshot struct{ sn *fsm.Snapshot }

func (r raftSnapshot) Persist(sink raft.SnapshotSink) error { return r.sn.Persist(sink) }
func (r raftSnapshot) Release()                             { r.sn.Release() }

// Close stops raft and releases the data directory.
func (n *Node) Close() error {
	n.stop.Do(func() { close(n.done) })
	err := n.Raft.Shutdown().Error()
	n.trans.Close()
	if cerr := n.bolt.Close(); err == nil {
		err = cerr
	}
	return err
}

// streamLayer is raft's transport over TCP, with mTLS when configured.
type streamLayer struct {
	net.Listener
	advertise net.Addr
	client    *tls.Config
}

func newStreamLayer(addr string, server, client *tls.Config) (*streamLayer, error) {
	var (
		l   net.Listener
		err error
	)
	if server != nil {
		l, err = tls.Listen("tcp", addr, server)
	} else {
		l, err = net.Listen("tcp", addr)
	}
	if err != nil {
		return nil, fmt.Errorf("listening for raft on %s: %w", addr, err)
	}
	adv := l.Addr()
	if ta, ok := adv.(*net.TCPAddr); ok && ta.IP.IsUnspecified() {
		l.Close()
		return nil, fmt.Errorf("raft address %s must name a reachable IP, not a wildcard (peers dial it)", addr)
	}
	return &streamLayer{Listener: l, advertise: adv, client: client}, nil
}

func (s *streamLayer) Addr() net.Addr { return s.advertise }

// raftHandshakeTimeout bounds how long an accepted raft connection may take
// to finish its TLS handshake: the raft port is reachable before any
// authentication, and raft serves each connection in its own goroutine
// forever, so a peer that connects and says nothing must be dropped.
var raftHandshakeTimeout = 10 * time.Second

// Accept hands raft connections whose TLS handshake has a deadline. The
// handshake itself runs on the connection's first read (in raft's goroutine
// for it), so one slow peer does not hold up accepting the others.
func (s *streamLayer) Accept() (net.Conn, error) {
	c, err := s.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc, ok := c.(*tls.Conn)
	if !ok {
		return c, nil
	}
	if err := tc.SetDeadline(time.Now().Add(raftHandshakeTimeout)); err != nil {
		tc.Close()
		return nil, err
	}
	return &handshakeConn{Conn: tc}, nil
}

// handshakeConn completes the TLS handshake under the deadline Accept set,
// then clears it: raft sets its own deadlines on established connections.
type handshakeConn struct {
	*tls.Conn
	once sync.Once
	err  error
}

func (h *handshakeConn) handshake() error {
	h.once.Do(func() {
		if h.err = h.Conn.Handshake(); h.err != nil {
			h.Conn.Close()
			return
		}
		h.err = h.Conn.SetDeadline(time.Time{})
	})
	return h.err
}

func (h *handshakeConn) Read(p []byte) (int, error) {
	if err := h.handshake(); err != nil {
		return 0, err
	}
	return h.Conn.Read(p)
}

func (h *handshakeConn) Write(p []byte) (int, error) {
	if err := h.handshake(); err != nil {
		return 0, err
	}
	return h.Conn.Write(p)
}

func (s *streamLayer) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	if s.client != nil {
		return tls.DialWithDialer(d, "tcp", string(addr), s.client)
	}
	return d.Dial("tcp", string(addr))
}

// hclogFor routes raft's hclog lines into zerolog (warnings and up).
func hclogFor(log zerolog.Logger) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:       "raft",
		Level:      hclog.Warn,
		Output:     zlWriter{log},
		JSONFormat: false,
	})
}

type zlWriter struct{ log zerolog.Logger }

func (w zlWriter) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(p))
	lvl := zerolog.InfoLevel
	switch {
	case strings.Contains(line, "[ERROR]"):
		lvl = zerolog.ErrorLevel
	case strings.Contains(line, "[WARN]"):
		lvl = zerolog.WarnLevel
	}
	w.log.WithLevel(lvl).Msg(line)
	return len(p), nil
}
