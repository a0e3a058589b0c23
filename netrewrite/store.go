package netrewrite

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"

	"github.com/ferry-dev/ferry/internal/atomicfile"
)

// Store keeps mapping records as one JSON file per old address in a
// directory (an agent's data dir), so expiry resumes after a restart. The
// registry holds the authoritative copy; this is the worker's local view.
type Store struct{ Dir string }

func (s Store) path(old Addr) string {
	return filepath.Join(s.Dir, strings.ReplaceAll(old.String(), ":", "_")+".json")
}

// Put writes m atomically (temp file + rename), replacing a record of the same old address.
func (s Store) Put(m Mapping) error {
	if err := checkPair(m.Old, m.New); err != nil {
		return err
	}
	if err := os.MkdirAll(s.Dir, 0o755); err != nil {
		return fmt.Errorf("mapping store: %w", err)
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(s.path(m.Old), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("mapping store: %w", err)
	}
	return nil
}

// Get returns the record of old; ok is false when there is none.
func (s Store) Get(old Addr) (m Mapping, ok bool, err error) {
	b, err := os.ReadFile(s.path(old))
	if errors.Is(err, os.ErrNotExist) {
		return Mapping{}, false, nil
	}
	if err != nil {
		return Mapping{}, false, fmt.Errorf("mapping store: %w", err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return Mapping{}, false, fmt.Errorf("mapping record %s: %w", s.path(old), err)
	}
	return m, true, nil
}

// Delete removes the record of old; a missing record is not an error.
func (s Store) Delete(old Addr) error {
	if err := os.Remove(s.path(old)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("mapping store: %w", err)
	}
	return nil
}

// List returns every record, sorted by Until. A missing directory is empty;
// an unreadable record is an error naming the file.
func (s Store) List() ([]Mapping, error) {
	ents, err := os.ReadDir(s.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("mapping store: %w", err)
	}
	var out []Mapping
	for _, e := range ents {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".json") || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		p := filepath.Join(s.Dir, e.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("mapping store: %w", err)
		}
		var m Mapping
		if err := json.Unmarshal(b, &m); err != nil {
			return nil, fmt.Errorf("mapping record %s: %w", p, err)
		}
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Until.Before(out[j].Until) })
	return out, nil
}

// ExpireDue expires every stored mapping whose grace period ended by now and
// deletes its record; it returns the ones it expired. Run it on a timer and
// at agent start (a crash during the grace period only delays expiry).
func (s Store) ExpireDue(ctx context.Context, log zerolog.Logger, now time.Time) ([]Mapping, error) {
	all, err := s.List()
	if err != nil {
		return nil, err
	}
	var done []Mapping
	var errs []error
	for _, m := range all {
		if m.Live(now) {
			continue
		}
		if err := ExpireMapping(ctx, log, m); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := s.Delete(m.Old); err != nil {
			errs = append(errs, err)
			continue
		}
		done = append(done, m)
	}
	return done, errors.Join(errs...)
}

// KernelMapping is a grace-period mapping found in a namespace's kernel state.
type KernelMapping struct {
	NS   string     `json:"ns"`
	Old  netip.Addr `json:"old"`
	Kind string     `json:"kind"`          // "route" (alias target or source forward) or "dnat"
	Dev  string     `json:"dev,omitempty"` // route: outgoing interface
	Via  netip.Addr `json:"via,omitzero"`  // route: next hop (source side)
	New  netip.Addr `json:"new,omitzero"`  // dnat: translated address
}

// KernelMappings lists the mappings live in ns: routes with protocol
// ProtoMapping and ferry's DNAT rules (when nft is installed).
func KernelMappings(ctx context.Context, ns string) ([]KernelMapping, error) {
	var out []KernelMapping
	err := withHandle(ns, func(h *netlink.Handle) error {
		routes, err := retryDump(func() ([]netlink.Route, error) {
			return h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Protocol: ProtoMapping}, netlink.RT_FILTER_PROTOCOL)
		})
		if err != nil {
			return fmt.Errorf("listing routes: %w", err)
		}
		for _, r := range routes {
			if r.Dst == nil {
				continue
			}
			km := KernelMapping{NS: ns, Kind: "route"}
			km.Old, _ = netip.AddrFromSlice(r.Dst.IP)
			if r.Gw != nil {
				km.Via, _ = netip.AddrFromSlice(r.Gw)
			}
			if l, err := h.LinkByIndex(r.LinkIndex); err == nil {
				km.Dev = l.Attrs().Name
			}
			out = append(out, km)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if _, err := lookNFT(); err == nil {
		rules, _, err := listNAT(ctx, ns)
		if err != nil {
			return nil, err
		}
		for _, r := range rules {
			old, _ := netip.ParseAddr(r.old)
			nw, _ := netip.ParseAddr(r.new)
			out = append(out, KernelMapping{NS: ns, Old: old, Kind: "dnat", New: nw})
		}
	}
	return out, nil
}
