package netrewrite

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"
)

// Mode says how the target keeps the old address working during the grace
// period.
type Mode string

const (
	// ModeAlias (the default) adds the old address to the machine's interface,
	// deprecated (preferred_lft 0), and routes it to the machine's veth. No
	// NAT and no conntrack: replies come from the address the peer used because
	// the machine really owns it; a program that binds the literal old address
	// (a database's listen_addresses) keeps working; the state is two plain
	// kernel objects, so a crash leaves nothing half-translated. Needs the
	// machine's interface to be ours to configure (true for a namespace or a
	// VM tap we own).
	ModeAlias Mode = "alias"
	// ModeNAT leaves the machine with only its new address and DNATs the old
	// one to the new one in the target worker's namespace (nftables table
	// ip6 ferry_6pn); conntrack rewrites the replies' source back to the old
	// address. For guests whose interface ferry cannot configure.
	ModeNAT Mode = "nat"
)

func (m Mode) orDefault() (Mode, error) {
	switch m {
	case "", ModeAlias:
		return ModeAlias, nil
	case ModeNAT:
		return ModeNAT, nil
	}
	return "", fmt.Errorf("mapping mode %q: use %q or %q", m, ModeAlias, ModeNAT)
}

// TargetPlan is the target worker's part of a cutover: the machine's new
// network (Machine.Addr is the new address) and the old address to keep
// answering for the grace period.
type TargetPlan struct {
	Machine MachineNet `json:"machine"`
	Old     Addr       `json:"old"`
	Mode    Mode       `json:"mode,omitempty"`
}

func (p TargetPlan) normalize() (TargetPlan, error) {
	m, err := p.Machine.withDefaults()
	if err != nil {
		return p, fmt.Errorf("target plan: %w", err)
	}
	p.Machine = m
	if p.Mode, err = p.Mode.orDefault(); err != nil {
		return p, fmt.Errorf("target plan: %w", err)
	}
	return p, checkPair(p.Old, p.Machine.Addr)
}

func checkPair(old, new Addr) error {
	switch {
	case !old.IsValid() || !new.IsValid():
		return fmt.Errorf("%w: the old and the new address are both required", ErrBadAddr)
	case old == new:
		return fmt.Errorf("%w: old and new address are both %s", ErrBadAddr, old)
	case old.Org() != new.Org():
		// A mapping across org networks would leak one org's traffic to another.
		return fmt.Errorf("%w: old %s (org %d) and new %s (org %d) are in different org networks",
			ErrBadAddr, old, old.Org(), new, new.Org())
	}
	return nil
}

// CutoverTarget brings up the machine's network on the target with its new
// address and makes the old address reach it too (see Mode). Idempotent.
func CutoverTarget(ctx context.Context, log zerolog.Logger, p TargetPlan) error {
	p, err := p.normalize()
	if err != nil {
		return err
	}
	if err := SetupMachineNet(ctx, log, p.Machine); err != nil {
		return fmt.Errorf("cutover on target: %w", err)
	}
	m := p.Machine
	switch p.Mode {
	case ModeAlias:
		err = withHandle(m.MachineNS, func(h *netlink.Handle) error {
			link, err := h.LinkByName(m.MachineIf)
			if err != nil {
				return err
			}
			return ensureAddr(h, link, p.Old.Prefix(), true)
		})
		var mac net.HardwareAddr
		if err == nil {
			mac, err = linkMAC(m.MachineNS, m.MachineIf)
		}
		if err == nil {
			err = withHandle(m.WorkerNS, func(h *netlink.Handle) error {
				link, err := h.LinkByName(m.HostVeth)
				if err != nil {
					return err
				}
				if err := pinNeighbor(h, link, p.Old.IP(), mac); err != nil {
					return err
				}
				return replaceDevRoute(h, link, p.Old.Prefix(), ProtoMapping)
			})
		}
	case ModeNAT:
		err = ensureNAT(ctx, m.WorkerNS, p.Old, m.Addr)
	}
	if err != nil {
		return fmt.Errorf("cutover on target: mapping %s -> %s: %w", p.Old, m.Addr, err)
	}
	log.Info().Str("old", p.Old.String()).Str("new", m.Addr.String()).Str("mode", string(p.Mode)).
		Str("worker_ns", m.WorkerNS).Msg("target cut over")
	return nil
}

// removeTargetMapping removes both kinds of mapping, whatever the mode, so a
// plan with a wrong mode still cleans up.
func removeTargetMapping(ctx context.Context, p TargetPlan) error {
	m := p.Machine
	var errs []error
	if NamespaceExists(m.MachineNS) {
		errs = append(errs, withHandle(m.MachineNS, func(h *netlink.Handle) error {
			return removeAddr(h, m.MachineIf, p.Old.Prefix())
		}))
	}
	if !workerGone(m.WorkerNS) {
		errs = append(errs, withHandle(m.WorkerNS, func(h *netlink.Handle) error {
			if err := deleteRoutes(h, p.Old.Prefix(), ProtoMapping); err != nil {
				return err
			}
			return unpinNeighbor(h, m.HostVeth, p.Old.IP())
		}))
		errs = append(errs, removeNAT(ctx, m.WorkerNS, p.Old, p.Mode == ModeNAT))
	}
	return errors.Join(errs...)
}

// workerGone reports a named worker namespace that no longer exists: its
// mappings went with it, so expiring them there is done, not an error.
func workerGone(ns string) bool { return ns != "" && !NamespaceExists(ns) }

// ExpireTarget ends the grace period on the target: the old address stops
// answering; the machine keeps its new address.
func ExpireTarget(ctx context.Context, log zerolog.Logger, p TargetPlan) error {
	p, err := p.normalize()
	if err != nil {
		return err
	}
	if err := CheckPrivileges(); err != nil {
		return err
	}
	if err := removeTargetMapping(ctx, p); err != nil {
		return fmt.Errorf("expiring %s on target: %w", p.Old, err)
	}
	log.Info().Str("old", p.Old.String()).Str("new", p.Machine.Addr.String()).Msg("old address expired on target")
	return nil
}

// RollbackTarget undoes CutoverTarget (and SetupMachineNet of the new
// address): mapping, veth and machine namespace are removed, leaving the
// target worker as it was. Idempotent.
func RollbackTarget(ctx context.Context, log zerolog.Logger, p TargetPlan) error {
	p, err := p.normalize()
	if err != nil {
		return err
	}
	if err := CheckPrivileges(); err != nil {
		return err
	}
	if err := removeTargetMapping(ctx, p); err != nil {
		return fmt.Errorf("rollback on target: %w", err)
	}
	if err := TeardownMachineNet(ctx, log, p.Machine); err != nil {
		return fmt.Errorf("rollback on target: %w", err)
	}
	log.Info().Str("old", p.Old.String()).Str("new", p.Machine.Addr.String()).Msg("target rolled back")
	return nil
}

// SourcePlan is the source worker's part of a cutover: the machine's network
// there (Machine.Addr is the old address) and the target worker's fabric
// address the old address is routed to during the grace period.
type SourcePlan struct {
	Machine MachineNet `json:"machine"`
	Via     netip.Addr `json:"via"`               // target worker's fabric address
	ViaDev  string     `json:"via_dev,omitempty"` // default FabricIf
}

func (p SourcePlan) normalize() (SourcePlan, error) {
	m, err := p.Machine.withDefaults()
	if err != nil {
		return p, fmt.Errorf("source plan: %w", err)
	}
	p.Machine = m
	if !p.Via.IsValid() || !p.Via.Is6() || p.Via.Is4In6() || p.Via.IsUnspecified() || p.Via.IsMulticast() {
		return p, fmt.Errorf("source plan: via %v: give the target worker's IPv6 fabric address", p.Via)
	}
	if p.ViaDev == "" {
		p.ViaDev = FabricIf
	}
	return p, nil
}

// CutoverSource takes the machine's address off the source and routes it to
// the target for the grace period. The /128 route is replaced in one netlink
// message, so the old address is never unrouted. The machine's namespace and
// veth stay until TeardownMachineNet (after the migration completes), which
// keeps RollbackSource cheap. Idempotent.
func CutoverSource(ctx context.Context, log zerolog.Logger, p SourcePlan) error {
	p, err := p.normalize()
	if err != nil {
		return err
	}
	if err := CheckPrivileges(); err != nil {
		return err
	}
	m := p.Machine
	err = withHandle(m.WorkerNS, func(h *netlink.Handle) error {
		dev, err := h.LinkByName(p.ViaDev)
		if err != nil {
			return fmt.Errorf("fabric interface %s: %w", p.ViaDev, err)
		}
		r := &netlink.Route{LinkIndex: dev.Attrs().Index, Dst: ipNet(m.Addr.Prefix()), Gw: p.Via.AsSlice(), Protocol: ProtoMapping}
		if err := h.RouteReplace(r); err != nil {
			return privErr(fmt.Errorf("route %s via %s: %w", m.Addr, p.Via, err))
		}
		return unpinNeighbor(h, m.HostVeth, m.Addr.IP())
	})
	if err == nil && NamespaceExists(m.MachineNS) {
		err = withHandle(m.MachineNS, func(h *netlink.Handle) error {
			return removeAddr(h, m.MachineIf, m.Addr.Prefix())
		})
	}
	if err != nil {
		return fmt.Errorf("cutover on source: %w", err)
	}
	log.Info().Str("old", m.Addr.String()).Str("via", p.Via.String()).Str("worker_ns", m.WorkerNS).Msg("source cut over")
	return nil
}

// ExpireSource removes the grace-period route of the old address.
func ExpireSource(ctx context.Context, log zerolog.Logger, p SourcePlan) error {
	p, err := p.normalize()
	if err != nil {
		return err
	}
	if err := CheckPrivileges(); err != nil {
		return err
	}
	if workerGone(p.Machine.WorkerNS) {
		return nil
	}
	if err := withHandle(p.Machine.WorkerNS, func(h *netlink.Handle) error {
		return deleteRoutes(h, p.Machine.Addr.Prefix(), ProtoMapping)
	}); err != nil {
		return fmt.Errorf("expiring %s on source: %w", p.Machine.Addr, err)
	}
	log.Info().Str("old", p.Machine.Addr.String()).Msg("old address expired on source")
	return nil
}

// RollbackSource puts the machine's network on the source back as it was
// before CutoverSource (address on the machine, /128 to its veth, no route to
// the target). Idempotent; also repairs a source whose cutover never ran.
func RollbackSource(ctx context.Context, log zerolog.Logger, p SourcePlan) error {
	p, err := p.normalize()
	if err != nil {
		return err
	}
	// SetupMachineNet's RouteReplace swaps the via-target route for the
	// veth route atomically; deleteRoutes then finds nothing left normally.
	if err := SetupMachineNet(ctx, log, p.Machine); err != nil {
		return fmt.Errorf("rollback on source: %w", err)
	}
	if err := withHandle(p.Machine.WorkerNS, func(h *netlink.Handle) error {
		return deleteRoutes(h, p.Machine.Addr.Prefix(), ProtoMapping)
	}); err != nil {
		return fmt.Errorf("rollback on source: %w", err)
	}
	log.Info().Str("addr", p.Machine.Addr.String()).Msg("source rolled back")
	return nil
}

// Mapping is the record of one old -> new address mapping, stored in the
// registry (and in a local Store) so expiry survives restarts. Target and
// Source are the local plans of the workers that applied them, when known.
type Mapping struct {
	Machine string      `json:"machine"`
	Old     Addr        `json:"old"`
	New     Addr        `json:"new"`
	Until   time.Time   `json:"until"`
	Target  *TargetPlan `json:"target,omitempty"`
	Source  *SourcePlan `json:"source,omitempty"`
}

// NewMapping records the mapping of a cutover that ends after grace.
func NewMapping(machine string, t TargetPlan, s *SourcePlan, now time.Time, grace time.Duration) (Mapping, error) {
	if err := checkPair(t.Old, t.Machine.Addr); err != nil {
		return Mapping{}, err
	}
	if grace <= 0 {
		return Mapping{}, fmt.Errorf("grace period %v: must be positive", grace)
	}
	if s != nil && s.Machine.Addr != t.Old {
		return Mapping{}, fmt.Errorf("source plan address %s is not the old address %s", s.Machine.Addr, t.Old)
	}
	tt := t
	return Mapping{Machine: machine, Old: t.Old, New: t.Machine.Addr, Until: now.Add(grace).UTC(), Target: &tt, Source: s}, nil
}

// Live reports whether the grace period is still running at now.
func (m Mapping) Live(now time.Time) bool { return now.Before(m.Until) }

// ExpireMapping removes the mapping's kernel state on every side whose plan
// it carries (both, in a one-host demo; one, on a real worker). Idempotent.
func ExpireMapping(ctx context.Context, log zerolog.Logger, m Mapping) error {
	if m.Target == nil && m.Source == nil {
		return fmt.Errorf("mapping %s -> %s carries no target or source plan; expire it on the workers that applied it", m.Old, m.New)
	}
	var errs []error
	if m.Target != nil {
		errs = append(errs, ExpireTarget(ctx, log, *m.Target))
	}
	if m.Source != nil {
		errs = append(errs, ExpireSource(ctx, log, *m.Source))
	}
	return errors.Join(errs...)
}
