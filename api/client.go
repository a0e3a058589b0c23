package api

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/retry"
)

// Client talks to a ferry cluster over mTLS. It tries the servers in turn:
// on a transport error or "no leader" (503) it moves on and retries with
// jittered backoff until RetryFor passes, re-sending the same body —
// proposals carry a step ID, so a retried proposal applies once. Writes go
// to the leader over this client's own connection: a follower's refusal
// names the leader (LeaderHeader) and the client sends the write there
// next (at most maxRedirects times in a row, and only to a peer whose
// certificate is a server's). It then keeps asking that leader, reads
// included, so what it wrote is what it reads, until the leader fails.
type Client struct {
	addrs    []string
	hc       *http.Client
	RetryFor time.Duration // total retry budget per call (default 30s)
	// RequestTimeout bounds one attempt against one server (default 10s);
	// a blocking watch gets its wait on top. A server that accepts but never
	// answers (stopped, partitioned) costs at most this before the next
	// server is tried.
	RequestTimeout time.Duration

	mu     sync.Mutex
	cur    int
	leader string // the leader a redirect led to, asked first while it answers
	// inflight holds the cancel of every blocking query under way, per
	// server, so that a request finding a server unresponsive moves the
	// watches off it at once instead of each waiting out its wait plus the
	// attempt timeout. Other requests (writes above all) keep their own
	// deadlines: cancelling them would only add load to a slow leader.
	inflight map[string]map[uint64]context.CancelCauseFunc
	nextID   uint64
	// suspects counts the times each server was found unresponsive: a
	// blocking query that chose a server before it was suspected, and
	// registers in inflight only after, is cancelled as it registers.
	suspects map[string]uint64
}

// NewClient returns a client for the given server API addresses (host:port)
// presenting the certificate in tlsConf (see tlsutil.ClientConfig).
func NewClient(addrs []string, tlsConf *tls.Config) (*Client, error) {
	var clean []string
	for _, a := range addrs {
		for _, p := range strings.Split(a, ",") {
			p = strings.TrimPrefix(strings.TrimSpace(p), "https://")
			if p != "" {
				clean = append(clean, strings.TrimSuffix(p, "/"))
			}
		}
	}
	if len(clean) == 0 {
		return nil, errors.New("no server address given (e.g. --server 127.0.0.1:7400)")
	}
	if tlsConf == nil {
		return nil, errors.New("the client needs a TLS config with a client certificate")
	}
	tr := &http.Transport{
		TLSClientConfig:       tlsConf,
		MaxIdleConnsPerHost:   8,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   DialTimeout,
		ExpectContinueTimeout: time.Second,
	}
	c := &Client{
		addrs:          clean,
		hc:             &http.Client{Transport: tr},
		RetryFor:       30 * time.Second,
		RequestTimeout: 10 * time.Second,
	}
	c.SetDialer((&net.Dialer{KeepAlive: 15 * time.Second}).DialContext)
	return c, nil
}

// DialTimeout bounds a TCP connect and, separately, a TLS handshake to one
// server: a stopped server's kernel still completes TCP handshakes from its
// listen backlog, so only a handshake deadline notices it.
const DialTimeout = 3 * time.Second

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

func retryable(err error) bool {
	if errors.Is(err, ErrUnavailable) {
		return true
	}
	var e *Error
	return errors.As(err, &e) && e.Kind.Retryable()
}

// do sends one request (with retries) and decodes the reply into out; it
// returns the X-Ferry-Index header when present.
func (c *Client) do(ctx context.Context, method, path string, q url.Values, in, out any) (uint64, error) {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return 0, fmt.Errorf("encoding request: %w", err)
		}
	}
	deadline := time.Now().Add(c.RetryFor)
	bo := retry.New(50*time.Millisecond, time.Second)
	redirect, redirects := "", 0
	for attempt := 0; ; attempt++ {
		addr, sticky := redirect, false
		c.mu.Lock()
		if addr == "" {
			if c.leader != "" {
				addr, sticky = c.leader, true
			} else {
				addr = c.addrs[c.cur%len(c.addrs)]
			}
		}
		gen := c.suspects[addr]
		c.mu.Unlock()
		idx, leader, err := c.once(ctx, addr, gen, method, path, q, body, out)
		if redirect != "" && (err == nil || !retryable(err)) {
			c.mu.Lock()
			c.leader = redirect
			c.mu.Unlock()
		}
		if err == nil || !retryable(err) || ctx.Err() != nil || time.Now().After(deadline) {
			if err != nil && ctx.Err() != nil {
				// A server that swallows packets (stopped, partitioned)
				// fails only by the caller's deadline: the next call, and
				// every request still waiting on it, tries another one.
				if errors.Is(ctx.Err(), context.DeadlineExceeded) && q.Get("index") == "" {
					c.suspect(addr)
				}
				return 0, fmt.Errorf("%s %s: %w", method, path, ctx.Err())
			}
			return idx, err
		}
		// The server did not answer in time, or could not be reached at
		// all: the requests still waiting on it move off it too (a quick
		// failure of a new connection to it while a watch waits there
		// left the watch to its own, much longer, deadline).
		if errors.Is(err, ErrUnavailable) && !errors.Is(err, errServerSuspect) {
			c.suspect(addr)
		}
		if leader != "" && leader != addr && redirects < maxRedirects {
			redirect = leader // straight there, no backoff: it is the leader now
			redirects++
			continue
		}
		redirect, redirects = "", 0
		c.mu.Lock()
		if sticky {
			if c.leader == addr {
				c.leader = "" // back to the configured servers, without a pause
			}
		} else if c.addrs[c.cur%len(c.addrs)] == addr {
			c.cur++ // unless another request (or suspect) moved on already
		}
		c.mu.Unlock()
		// Fail over to the next server at once; back off (jittered, so
		// agents do not retry in lockstep) once every server was tried.
		if !sticky && attempt >= len(c.addrs)-1 {
			if !retry.Sleep(ctx, bo.Next()) {
				return 0, fmt.Errorf("%s %s: %w (last error: %v)", method, path, ctx.Err(), err)
			}
		}
	}
}

// maxRedirects bounds how many leader redirects a request follows in a row
// (a leader change in the middle makes a second one normal).
const maxRedirects = 3

// attemptTimeout is the budget of one attempt: RequestTimeout, plus the
// wait of a blocking query (the server holds it up to that long, 30s when
// not given).
func (c *Client) attemptTimeout(q url.Values) time.Duration {
	t := c.RequestTimeout
	if t <= 0 {
		t = 10 * time.Second
	}
	if q.Get("index") != "" {
		wait := 30 * time.Second
		if w, err := time.ParseDuration(q.Get("wait")); err == nil && w > 0 {
			wait = w
		}
		t += wait
	}
	return t
}

// once sends one request to addr, chosen when addr had been suspected gen
// times; leader is the address a follower's refusal named.
func (c *Client) once(ctx context.Context, addr string, gen uint64, method, path string, q url.Values, body []byte, out any) (idx uint64, leader string, err error) {
	ctx, cancel := context.WithTimeoutCause(ctx, c.attemptTimeout(q), errAttemptTimeout)
	defer cancel()
	if q.Get("index") != "" {
		var release func()
		ctx, release = c.track(ctx, addr, gen)
		defer release()
	}
	defer func() {
		if err != nil && errors.Is(context.Cause(ctx), errServerSuspect) && !errors.Is(err, ErrUnavailable) {
			err = fmt.Errorf("%w: %s: %w", ErrUnavailable, addr, errServerSuspect)
		}
	}()
	u := "https://" + addr + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	var rd *bytes.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	var req *http.Request
	if rd != nil {
		req, err = http.NewRequestWithContext(ctx, method, u, rd)
	} else {
		req, err = http.NewRequestWithContext(ctx, method, u, nil)
	}
	if err != nil {
		return 0, "", err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		switch cause := context.Cause(ctx); {
		case errors.Is(cause, errAttemptTimeout):
			err = fmt.Errorf("%w after %v", errAttemptTimeout, c.attemptTimeout(q))
		case errors.Is(cause, errServerSuspect):
			err = errServerSuspect
		}
		return 0, "", fmt.Errorf("%w: %s: %w", ErrUnavailable, addr, err)
	}
	defer resp.Body.Close()
	if h := resp.Header.Get(IndexHeader); h != "" {
		idx, _ = strconv.ParseUint(h, 10, 64)
	}
	if resp.StatusCode == http.StatusServiceUnavailable {
		leader = validLeaderHint(resp.Header.Get(LeaderHeader))
	}
	err = DecodeReply(resp, out)
	if err != nil && errors.Is(context.Cause(ctx), errServerSuspect) {
		return 0, "", fmt.Errorf("%w: %s: reading the reply: %w", ErrUnavailable, addr, errServerSuspect)
	}
	if err != nil && errors.Is(context.Cause(ctx), errAttemptTimeout) {
		// The reply stalled mid-body: the server is as good as gone.
		return 0, "", fmt.Errorf("%w: %s: reading the reply: %w", ErrUnavailable, addr, errAttemptTimeout)
	}
	return idx, leader, err
}

// validLeaderHint keeps a redirect only when it is a plain host:port.
func validLeaderHint(h string) string {
	host, port, err := net.SplitHostPort(h)
	if err != nil || host == "" || port == "" || len(h) > 255 || strings.ContainsAny(h, "/?#@ ") {
		return ""
	}
	return h
}

var errAttemptTimeout = errors.New("the server did not answer in time")

// errServerSuspect cancels the attempts still waiting on a server after
// another request found it unresponsive.
var errServerSuspect = errors.New("another request found this server unresponsive")

// track registers a blocking query's attempt on addr; release unregisters
// it. An attempt that chose addr before another request suspected it (gen
// is out of date) starts cancelled: it would otherwise wait there unseen.
func (c *Client) track(ctx context.Context, addr string, gen uint64) (context.Context, func()) {
	ctx, cancel := context.WithCancelCause(ctx)
	c.mu.Lock()
	if c.suspects[addr] != gen {
		cancel(errServerSuspect)
	}
	if c.inflight == nil {
		c.inflight = map[string]map[uint64]context.CancelCauseFunc{}
	}
	if c.inflight[addr] == nil {
		c.inflight[addr] = map[uint64]context.CancelCauseFunc{}
	}
	c.nextID++
	id := c.nextID
	c.inflight[addr][id] = cancel
	c.mu.Unlock()
	return ctx, func() {
		c.mu.Lock()
		delete(c.inflight[addr], id)
		c.mu.Unlock()
		cancel(nil)
	}
}

// suspect moves this client off addr, which did not answer in time: the
// next request starts at another server, and the blocking queries still
// waiting on addr are cancelled, to be retried on another server at once.
func (c *Client) suspect(addr string) {
	c.mu.Lock()
	if c.suspects == nil {
		c.suspects = map[string]uint64{}
	}
	c.suspects[addr]++
	if c.leader == addr {
		c.leader = ""
	}
	if c.addrs[c.cur%len(c.addrs)] == addr {
		c.cur++
	}
	waiting := c.inflight[addr]
	delete(c.inflight, addr)
	c.mu.Unlock()
	for _, cancel := range waiting {
		cancel(errServerSuspect)
	}
}

func esc(s string) string { return url.PathEscape(s) }

// Status returns the answering server's view of the cluster.
func (c *Client) Status(ctx context.Context) (*StatusReply, error) {
	var r StatusReply
	_, err := c.do(ctx, http.MethodGet, "/v1/status", nil, nil, &r)
	return &r, err
}

// RegisterWorker registers (or refreshes) a worker and starts its lease.
func (c *Client) RegisterWorker(ctx context.Context, w fsm.Worker, ttl time.Duration) (*fsm.Worker, error) {
	var r fsm.Worker
	_, err := c.do(ctx, http.MethodPost, "/v1/workers", nil, RegisterWorkerRequest{Worker: w, LeaseTTL: Duration(ttl)}, &r)
	return &r, err
}

// Heartbeat extends a worker's lease by ttl (0 = server default).
func (c *Client) Heartbeat(ctx context.Context, name string, ttl time.Duration) (*fsm.Worker, error) {
	var r fsm.Worker
	_, err := c.do(ctx, http.MethodPost, "/v1/workers/"+esc(name)+"/heartbeat", nil, HeartbeatRequest{LeaseTTL: Duration(ttl)}, &r)
	return &r, err
}

// ListWorkers returns every worker.
func (c *Client) ListWorkers(ctx context.Context) ([]fsm.Worker, error) {
	var r []fsm.Worker
	_, err := c.do(ctx, http.MethodGet, "/v1/workers", nil, nil, &r)
	return r, err
}

// GetWorker returns one worker (its lease included).
func (c *Client) GetWorker(ctx context.Context, name string) (*fsm.Worker, error) {
	var r fsm.Worker
	_, err := c.do(ctx, http.MethodGet, "/v1/workers/"+esc(name), nil, nil, &r)
	return &r, err
}

// CreateVolume registers a volume (a retried identical create returns the same volume).
func (c *Client) CreateVolume(ctx context.Context, v fsm.Volume) (*fsm.Volume, error) {
	var r fsm.Volume
	_, err := c.do(ctx, http.MethodPost, "/v1/volumes", nil, v, &r)
	return &r, err
}

// ListVolumes returns the volumes on worker (all when empty).
func (c *Client) ListVolumes(ctx context.Context, worker string) ([]fsm.Volume, error) {
	r, _, err := c.WatchVolumes(ctx, worker, 0, 0)
	return r, err
}

// WatchVolumes blocks until the store moves past index (or wait passes) and
// returns the volumes on worker with the new index.
func (c *Client) WatchVolumes(ctx context.Context, worker string, index uint64, wait time.Duration) ([]fsm.Volume, uint64, error) {
	var r []fsm.Volume
	idx, err := c.do(ctx, http.MethodGet, "/v1/volumes", watchQuery(worker, index, wait), nil, &r)
	return r, idx, err
}

// GetVolume returns one volume.
func (c *Client) GetVolume(ctx context.Context, id string) (*fsm.Volume, error) {
	var r fsm.Volume
	_, err := c.do(ctx, http.MethodGet, "/v1/volumes/"+esc(id), nil, nil, &r)
	return &r, err
}

// UpdateVolume changes the fields set in u.
func (c *Client) UpdateVolume(ctx context.Context, id string, u VolumeUpdate) (*fsm.Volume, error) {
	var r fsm.Volume
	_, err := c.do(ctx, http.MethodPatch, "/v1/volumes/"+esc(id), nil, u, &r)
	return &r, err
}

// SetVolumeState is UpdateVolume of the state alone.
func (c *Client) SetVolumeState(ctx context.Context, id string, st fsm.VolumeState) (*fsm.Volume, error) {
	return c.UpdateVolume(ctx, id, VolumeUpdate{State: &st})
}

// DestroyVolume moves a volume to pending_destroy (kept for retention; 0 =
// server default), or to destroyed once its retention passed. An attached
// volume is refused (code "attached").
func (c *Client) DestroyVolume(ctx context.Context, id string, retention time.Duration) (*fsm.Volume, error) {
	var q url.Values
	if retention > 0 {
		q = url.Values{"retention": {retention.String()}}
	}
	var r fsm.Volume
	_, err := c.do(ctx, http.MethodDelete, "/v1/volumes/"+esc(id), q, nil, &r)
	return &r, err
}

// ExtendVolume asks for volume id to grow to size bytes; its worker grows it
// online and reports the new size (Volume.Extending turns false). Shrinking
// and a volume in migration are refused.
func (c *Client) ExtendVolume(ctx context.Context, id string, size int64) (*fsm.Volume, error) {
	var r fsm.Volume
	_, err := c.do(ctx, http.MethodPost, "/v1/volumes/"+esc(id)+"/extend", nil, VolumeExtend{Size: size}, &r)
	return &r, err
}

// ForkVolume registers volume id as a point-in-time copy of source on
// worker (today: the source's worker). The copy has no key until one is
// set; its worker makes it and marks it created.
func (c *Client) ForkVolume(ctx context.Context, source, id, worker string) (*fsm.Volume, error) {
	var r fsm.Volume
	_, err := c.do(ctx, http.MethodPost, "/v1/volumes/"+esc(source)+"/fork", nil, VolumeFork{ID: id, Worker: worker}, &r)
	return &r, err
}

// ForksFrom lists the forks to other workers whose copy worker makes or
// still serves.
func (c *Client) ForksFrom(ctx context.Context, worker string) ([]fsm.Volume, error) {
	var r []fsm.Volume
	_, err := c.do(ctx, http.MethodGet, "/v1/workers/"+esc(worker)+"/forks", nil, nil, &r)
	return r, err
}

// ServeFork reports a fork's copy served (or released) by this worker.
func (c *Client) ServeFork(ctx context.Context, id string, f ForkServe) (*fsm.Volume, error) {
	var r fsm.Volume
	_, err := c.do(ctx, http.MethodPost, "/v1/volumes/"+esc(id)+"/fork-serve", nil, f, &r)
	return &r, err
}

// PutEnvelopes stores sealed copies of a volume's key. The servers check
// who may seal what (docs/security.md) and can open none of them.
func (c *Client) PutEnvelopes(ctx context.Context, id string, envs []fsm.Envelope) (*fsm.Volume, error) {
	var r fsm.Volume
	_, err := c.do(ctx, http.MethodPost, "/v1/volumes/"+esc(id)+"/envelopes", nil, EnvelopesRequest{Envelopes: envs}, &r)
	return &r, err
}

// GetEnvelope returns one envelope of a volume's key: owner (its worker
// only), migration (the active migration's target only) or recovery
// (operators only). The read is audited by the server, not replicated.
// With index 0 only the leader answers (a follower says to retry, and the
// client moves on); a follower answers once it applied index.
func (c *Client) GetEnvelope(ctx context.Context, id string, purpose fsm.Purpose, index uint64) (*fsm.Envelope, error) {
	var q url.Values
	if index > 0 {
		q = url.Values{"index": {strconv.FormatUint(index, 10)}}
	}
	var r fsm.Envelope
	_, err := c.do(ctx, http.MethodGet, "/v1/volumes/"+esc(id)+"/envelopes/"+esc(string(purpose)), q, nil, &r)
	return &r, err
}

// ListEnvelopes lists which envelopes a volume has, without ciphertext.
func (c *Client) ListEnvelopes(ctx context.Context, id string) ([]fsm.Envelope, error) {
	var r []fsm.Envelope
	_, err := c.do(ctx, http.MethodGet, "/v1/volumes/"+esc(id)+"/envelopes", nil, nil, &r)
	return r, err
}

// SetWorkerKey registers the calling worker's key-encryption public key.
func (c *Client) SetWorkerKey(ctx context.Context, worker string, k fsm.PublicKey) (*fsm.Worker, error) {
	var r fsm.Worker
	_, err := c.do(ctx, http.MethodPut, "/v1/workers/"+esc(worker)+"/key", nil, k, &r)
	return &r, err
}

// RecoveryKey returns the cluster's recovery public key (not found until
// `ferry keys recovery-init` ran).
func (c *Client) RecoveryKey(ctx context.Context) (*fsm.PublicKey, error) {
	var r fsm.PublicKey
	_, err := c.do(ctx, http.MethodGet, "/v1/keys/recovery", nil, nil, &r)
	return &r, err
}

// SetRecoveryKey stores the cluster's recovery public key (operators only, once).
func (c *Client) SetRecoveryKey(ctx context.Context, k fsm.PublicKey) error {
	_, err := c.do(ctx, http.MethodPut, "/v1/keys/recovery", nil, k, nil)
	return err
}

// CreateMachine registers a machine (attaching its volume).
func (c *Client) CreateMachine(ctx context.Context, m fsm.Machine) (*fsm.Machine, error) {
	var r fsm.Machine
	_, err := c.do(ctx, http.MethodPost, "/v1/machines", nil, m, &r)
	return &r, err
}

// ListMachines returns the machines on worker (all when empty).
func (c *Client) ListMachines(ctx context.Context, worker string) ([]fsm.Machine, error) {
	var r []fsm.Machine
	_, err := c.do(ctx, http.MethodGet, "/v1/machines", watchQuery(worker, 0, 0), nil, &r)
	return r, err
}

// GetMachine returns one machine.
func (c *Client) GetMachine(ctx context.Context, id string) (*fsm.Machine, error) {
	var r fsm.Machine
	_, err := c.do(ctx, http.MethodGet, "/v1/machines/"+esc(id), nil, nil, &r)
	return &r, err
}

// UpdateMachine changes the fields set in u.
func (c *Client) UpdateMachine(ctx context.Context, id string, u MachineUpdate) (*fsm.Machine, error) {
	var r fsm.Machine
	_, err := c.do(ctx, http.MethodPatch, "/v1/machines/"+esc(id), nil, u, &r)
	return &r, err
}

// CreateMigration plans a migration (operator or server certificate). A
// refusal says why: locks, admission limits, leases, volume state.
func (c *Client) CreateMigration(ctx context.Context, p PlanRequest) (*fsm.Migration, error) {
	if p.ID == "" {
		p.ID = NewStepID("mig-") // chosen here so a retried plan is recognised
	}
	var r fsm.Migration
	_, err := c.do(ctx, http.MethodPost, "/v1/migrations", nil, p, &r)
	return &r, err
}

// ListMigrations returns the migrations naming worker (all when empty).
func (c *Client) ListMigrations(ctx context.Context, worker string) ([]*fsm.Migration, error) {
	r, _, err := c.WatchMigrations(ctx, worker, 0)
	return r, err
}

// WatchMigrations blocks until a migration naming worker changes after
// index (at most ~30s), then returns them all and the index to pass next.
// index 0 returns at once.
func (c *Client) WatchMigrations(ctx context.Context, worker string, index uint64) ([]*fsm.Migration, uint64, error) {
	var r []*fsm.Migration
	idx, err := c.do(ctx, http.MethodGet, "/v1/migrations", watchQuery(worker, index, 0), nil, &r)
	return r, idx, err
}

// GetMigration returns one migration.
func (c *Client) GetMigration(ctx context.Context, id string) (*fsm.Migration, error) {
	m, _, err := c.WatchMigration(ctx, id, 0)
	return m, err
}

// WatchMigration blocks until migration id changes after index.
func (c *Client) WatchMigration(ctx context.Context, id string, index uint64) (*fsm.Migration, uint64, error) {
	var r fsm.Migration
	idx, err := c.do(ctx, http.MethodGet, "/v1/migrations/"+esc(id), watchQuery("", index, 0), nil, &r)
	return &r, idx, err
}

// Propose proposes event on migration id. stepID makes it idempotent
// (generated when empty; pass your own to make a retry after a crash
// apply once). A refusal is an *Error with the migration's actual State.
// For a rate-limited progress update the migration is returned unchanged.
func (c *Client) Propose(ctx context.Context, id string, ev fsm.Event, stepID string, p fsm.EventPayload) (*fsm.Migration, error) {
	if stepID == "" {
		stepID = NewStepID("step-")
	}
	var r ProposeReply
	_, err := c.do(ctx, http.MethodPost, "/v1/migrations/"+esc(id)+"/events", nil, ProposeRequest{Event: ev, StepID: stepID, Payload: p}, &r)
	if err != nil {
		return nil, err
	}
	return r.Migration, nil
}

// Abort rolls a migration back; refused (code "past_cutover") at or after cutover.
func (c *Client) Abort(ctx context.Context, id, reason string) (*fsm.Migration, error) {
	var r ProposeReply
	_, err := c.do(ctx, http.MethodPost, "/v1/migrations/"+esc(id)+"/abort", nil, AbortRequest{Reason: reason, StepID: NewStepID("abort-")}, &r)
	if err != nil {
		return nil, err
	}
	return r.Migration, nil
}

// RemoveServer removes a (dead) server from the raft cluster (operator).
func (c *Client) RemoveServer(ctx context.Context, id string) error {
	_, err := c.do(ctx, http.MethodDelete, "/v1/servers/"+esc(id), nil, nil, nil)
	return err
}

// Locks returns the lock table (lock name -> migration ID).
func (c *Client) Locks(ctx context.Context) (map[string]string, error) {
	var r map[string]string
	_, err := c.do(ctx, http.MethodGet, "/v1/locks", nil, nil, &r)
	return r, err
}

func watchQuery(worker string, index uint64, wait time.Duration) url.Values {
	q := url.Values{}
	if worker != "" {
		q.Set("worker", worker)
	}
	if index > 0 {
		q.Set("index", strconv.FormatUint(index, 10))
		if wait > 0 {
			q.Set("wait", wait.String())
		}
	}
	return q
}

// NewStepID returns a fresh random ID with a prefix (step IDs, and the
// migration ID the server picks when a plan names none).
func NewStepID(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}
