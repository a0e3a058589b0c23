// Package exporter serves frozen volumes to one migration target each with
// ferry's embedded iSCSI target, and finds again what a killed agent left.
package exporter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/atomicfile"
	"github.com/ferry-dev/ferry/iscsi"
)

// Exporter serves frozen volumes with ferry's embedded iSCSI target.
// Its gate speaks mutual TLS and admits only the certificate of the
// migration's target worker, from the target's registered address alone.
// The gate of an export lives in the agent process, so an export left by a
// killed agent is unreachable: it is stopped and restarted on the portal
// recorded before, which the target's initiator reconnects to.
type Exporter struct {
	Log      zerolog.Logger
	StateDir string // DataDir/exports
	Address  string // IP the gate listens on (this worker's fabric address)
	Domain   string // IQN naming authority, e.g. "dev.ferry"
	// TLSDir and Name are this worker's certificate folder and name (the
	// agent's --tls-dir and --cert): the gate presents it and trusts
	// TLSDir's CA for the target's.
	TLSDir, Name string
	// PlainTCP serves without TLS, admitted by address only. Only for tests
	// and hosts whose fabric is otherwise protected; never the default.
	PlainTCP bool
	// Revoked reads the cluster's revoked certificate serials (the agent's
	// server client). With it an export starts only with the current list
	// (a revoked target never gets in, even in the first seconds), and
	// WatchRevoked keeps every live export's list current.
	Revoked RevokedSource
	// Deny is this agent's copy of the list; the data path's tunnel reads
	// it too (nil: the exporter keeps its own).
	Deny *iscsi.DenyList
	// DenyEvery is how often WatchRevoked reads the list (default 5 s): a
	// revoked target reads for at most about this long.
	DenyEvery time.Duration

	// refreshMu orders list reads: a read that began before a revocation
	// must not replace the newer list a later read already set.
	refreshMu sync.Mutex

	mu   sync.Mutex
	live map[string]*iscsi.Export
	sent map[string][]string // migration -> the deny list its export last took
}

// RevokedSource lists the revoked certificate serials
// (api.Client.RevokedSerials).
type RevokedSource interface {
	RevokedSerials(ctx context.Context) ([]string, error)
}

// defaultDenyEvery bounds how long a revocation takes to reach the gates.
const defaultDenyEvery = 5 * time.Second

type exportRecord struct {
	Portal string `json:"portal"`
	IQN    string `json:"iqn"`
}

func (x *Exporter) recordPath(id string) string { return filepath.Join(x.StateDir, id+".json") }
func (x *Exporter) dir(id string) string        { return filepath.Join(x.StateDir, id) }

func (x *Exporter) Live(id string) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	e, ok := x.live[id]
	if !ok {
		return false
	}
	select {
	case <-e.Done():
		delete(x.live, id)
		return false
	default:
		return true
	}
}

// Export serves path for migration id to the worker target, whose
// registered address is allow.
func (x *Exporter) Export(ctx context.Context, id, path, target, allow string) (string, string, error) {
	if x.Live(id) {
		x.mu.Lock()
		e := x.live[id]
		x.mu.Unlock()
		return e.Portal(), e.IQN(), nil
	}
	if err := fsm.LocalID("migration", id); err != nil {
		return "", "", err
	}
	if err := os.MkdirAll(x.StateDir, 0o700); err != nil {
		return "", "", err
	}
	// An export recorded by an earlier agent process has lost its gate.
	if _, err := iscsi.StopRecorded(x.dir(id)); err != nil {
		return "", "", fmt.Errorf("stop the stale export of %s: %w", id, err)
	}
	killStrayExports(x.dir(id))
	rec := exportRecord{Portal: net.JoinHostPort(x.Address, "0"), IQN: iscsi.MigrationIQN(x.Domain, id, time.Now())}
	if b, err := os.ReadFile(x.recordPath(id)); err == nil {
		if err := json.Unmarshal(b, &rec); err != nil {
			return "", "", fmt.Errorf("export record of %s: %w", id, err)
		}
	}
	// The target's registered address admits that one host: a prefix (or
	// anything else) would open the export to more than the target.
	ip, err := fsm.ParseWorkerAddress(allow)
	if err != nil {
		return "", "", fmt.Errorf("export of %s: target address: %w", id, err)
	}
	allowNet := netip.PrefixFrom(ip, ip.BitLen()).String()
	gateTLS, err := x.gateTLS(target)
	if err != nil {
		return "", "", fmt.Errorf("export of %s: %w", id, err)
	}
	if gateTLS != nil && x.Revoked != nil {
		if gateTLS.Denied, err = x.refreshDeny(ctx); err != nil {
			return "", "", fmt.Errorf("export of %s: %w (an export starts only knowing which certificates are revoked; it is retried once the servers answer)", id, err)
		}
	}
	e, err := iscsi.StartExport(ctx, x.Log, iscsi.ExportConfig{Path: path, Listen: rec.Portal, Allow: []string{allowNet},
		IQN: rec.IQN, StateDir: x.dir(id), TLS: gateTLS})
	if err != nil {
		return "", "", err
	}
	// Record the portal before anyone relies on it, so a restart reuses it.
	rec.Portal = e.Portal()
	b, _ := json.Marshal(rec)
	if err := atomicfile.WriteFile(x.recordPath(id), b, 0o600); err != nil {
		e.Stop()
		return "", "", err
	}
	x.mu.Lock()
	if x.live == nil {
		x.live, x.sent = map[string]*iscsi.Export{}, map[string][]string{}
	}
	x.live[id] = e
	if gateTLS != nil {
		x.sent[id] = gateTLS.Denied
	}
	x.mu.Unlock()
	return e.Portal(), e.IQN(), nil
}

// gateTLS is the gate's mutual TLS admitting target's certificate alone.
func (x *Exporter) gateTLS(target string) (*iscsi.GateTLS, error) {
	if x.PlainTCP {
		x.Log.Warn().Msg("export without TLS: admitted by address only, the ciphertext crosses the fabric unauthenticated")
		return nil, nil
	}
	if x.TLSDir == "" || x.Name == "" {
		return nil, errors.New("no certificate to serve the export over TLS: set the worker's --tls-dir and --cert")
	}
	if target == "" {
		return nil, errors.New("no target worker named: the export admits one worker's certificate")
	}
	return iscsi.GateTLSFromDir(x.TLSDir, x.Name, target)
}

func (x *Exporter) Unexport(ctx context.Context, id string) error {
	if err := fsm.LocalID("migration", id); err != nil {
		return err
	}
	x.mu.Lock()
	e := x.live[id]
	delete(x.live, id)
	delete(x.sent, id)
	x.mu.Unlock()
	var err error
	if e != nil {
		err = e.Stop()
	}
	if _, serr := iscsi.StopRecorded(x.dir(id)); serr != nil && err == nil {
		err = serr
	}
	killStrayExports(x.dir(id))
	os.RemoveAll(x.dir(id))
	if rerr := os.Remove(x.recordPath(id)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
		err = rerr
	}
	return err
}

// denyList is x.Deny, made on first use when the agent gave none.
func (x *Exporter) denyList() *iscsi.DenyList {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.Deny == nil {
		x.Deny = &iscsi.DenyList{}
	}
	return x.Deny
}

// refreshDeny reads the revoked serials from the servers into the deny
// list and returns them.
func (x *Exporter) refreshDeny(ctx context.Context) ([]string, error) {
	x.refreshMu.Lock()
	defer x.refreshMu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	serials, err := x.Revoked.RevokedSerials(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading the revoked certificates: %w", err)
	}
	d := x.denyList()
	changed, err := d.Set(serials)
	if err != nil {
		return nil, fmt.Errorf("revoked certificates from the servers: %w", err)
	}
	if changed {
		x.Log.Info().Int("serials", len(serials)).Msg("certificate deny list changed")
		// Kept for the next start: until the servers answer again, the
		// tunnels and clones of a restarted agent check the last list
		// read, not an empty one.
		if b, err := json.Marshal(d.Serials()); err == nil {
			if err := atomicfile.WriteFile(x.denyPath(), b, 0o600); err != nil {
				x.Log.Warn().Err(err).Msg("keeping the certificate deny list on disk")
			}
		}
	}
	return d.Serials(), nil
}

func (x *Exporter) denyPath() string { return filepath.Join(x.StateDir, "revoked-serials.json") }

// LoadDeny fills the deny list with the one the last run kept, if any. The
// agent calls it before it adopts clones or tunnels, so a restart does not
// open a window in which a revoked peer is admitted.
func (x *Exporter) LoadDeny() error {
	b, err := os.ReadFile(x.denyPath())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading the kept certificate deny list: %w", err)
	}
	var serials []string
	if err := json.Unmarshal(b, &serials); err != nil {
		return fmt.Errorf("the kept certificate deny list %s is not a JSON list of serials (delete it; the servers' list replaces it): %w", x.denyPath(), err)
	}
	if _, err := x.denyList().Set(serials); err != nil {
		return fmt.Errorf("the kept certificate deny list %s: %w", x.denyPath(), err)
	}
	return nil
}

// WatchRevoked reads the revoked serials every DenyEvery until ctx ends and
// sends every live export whose gate holds another list the current one:
// the gate then cuts the connections of a target revoked meanwhile. The
// agent runs it on every worker, exporting or not: the data path's tunnel
// reads the same list. A failed read keeps the last list and is retried.
func (x *Exporter) WatchRevoked(ctx context.Context) {
	if x.Revoked == nil {
		return
	}
	every := x.DenyEvery
	if every <= 0 {
		every = defaultDenyEvery
	}
	failing := false
	for {
		serials, err := x.refreshDeny(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			if !failing {
				x.Log.Warn().Err(err).Msg("cannot refresh the certificate deny list: the gates keep the last one")
			}
			failing = true
		case err == nil:
			if failing {
				x.Log.Info().Msg("certificate deny list readable again")
			}
			failing = false
			x.pushDeny(ctx, serials)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
	}
}

// pushDeny sends serials to every live TLS export that has not taken them.
func (x *Exporter) pushDeny(ctx context.Context, serials []string) {
	if x.PlainTCP {
		return
	}
	type pending struct {
		id string
		e  *iscsi.Export
	}
	var todo []pending
	x.mu.Lock()
	for id, e := range x.live {
		if !slices.Equal(x.sent[id], serials) {
			todo = append(todo, pending{id, e})
		}
	}
	x.mu.Unlock()
	// In parallel: one hung export must not delay the others' list.
	var wg sync.WaitGroup
	for _, p := range todo {
		wg.Add(1)
		go func(p pending) {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := p.e.SetDenied(cctx, serials)
			cancel()
			if err != nil {
				x.Log.Warn().Err(err).Str("migration", p.id).Msg("export did not take the new deny list; retrying")
				return
			}
			x.mu.Lock()
			if x.live[p.id] == p.e {
				x.sent[p.id] = serials
			}
			x.mu.Unlock()
			x.Log.Info().Str("migration", p.id).Int("serials", len(serials)).Msg("export took the new deny list")
		}(p)
	}
	wg.Wait()
}
