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
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/atomicfile"
	"github.com/ferry-dev/ferry/iscsi"
)

// Exporter serves frozen volumes with ferry's embedded iSCSI target.
// The gate of an export lives in the agent process, so an export left by a
// killed agent is unreachable: it is stopped and restarted on the portal
// recorded before, which the target's initiator reconnects to.
type Exporter struct {
	Log      zerolog.Logger
	StateDir string // DataDir/exports
	Address  string // IP the gate listens on (this worker's fabric address)
	Domain   string // IQN naming authority, e.g. "dev.ferry"

	mu   sync.Mutex
	live map[string]*iscsi.Export
}

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

func (x *Exporter) Export(ctx context.Context, id, path, allow string) (string, string, error) {
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
	e, err := iscsi.StartExport(ctx, x.Log, iscsi.ExportConfig{Path: path, Listen: rec.Portal, Allow: []string{allowNet},
		IQN: rec.IQN, StateDir: x.dir(id)})
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
		x.live = map[string]*iscsi.Export{}
	}
	x.live[id] = e
	x.mu.Unlock()
	return e.Portal(), e.IQN(), nil
}

func (x *Exporter) Unexport(ctx context.Context, id string) error {
	if err := fsm.LocalID("migration", id); err != nil {
		return err
	}
	x.mu.Lock()
	e := x.live[id]
	delete(x.live, id)
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
