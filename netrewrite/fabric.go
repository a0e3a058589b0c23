package netrewrite

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"
)

// FabricIf is the interface name of a member's link to the fabric bridge.
const FabricIf = "fab0"

// Fabric is the private IPv6 network between workers (and test peers): one
// bridge in its own namespace, a veth from each member namespace to it, and
// a fabric address per member. Workers route each other's 6PN host prefixes
// over it (RouteOrg). It models the datacenter network in tests and demos.
type Fabric struct {
	BridgeNS string         `json:"bridge_ns"`
	Prefix   netip.Prefix   `json:"prefix"` // e.g. fd00:fe::/64, private
	Members  []FabricMember `json:"members"`
}

// FabricMember is one namespace on the fabric. HostID is the worker's 32-bit
// 6PN host id, or 0 for a plain peer that hosts no machines.
type FabricMember struct {
	NS     string     `json:"ns"`
	HostID uint32     `json:"host_id,omitempty"`
	Addr   netip.Addr `json:"addr"`
}

// ParseFabricMember reads "NS,HOSTID,FABRICADDR" (HOSTID in decimal or
// 0x-hex, 0 for a plain peer), as `ferry net fabric --member` takes it.
func ParseFabricMember(s string) (FabricMember, error) {
	parts := strings.Split(s, ",")
	if len(parts) != 3 {
		return FabricMember{}, fmt.Errorf("fabric member %q: use NS,HOSTID,FABRICADDR (HOSTID 0 for a peer)", s)
	}
	if err := validNSName(parts[0]); err != nil {
		return FabricMember{}, fmt.Errorf("fabric member %q: %w", s, err)
	}
	host, err := strconv.ParseUint(parts[1], 0, 32)
	if err != nil {
		return FabricMember{}, fmt.Errorf("fabric member %q: host id %q: give a 32-bit id in decimal or 0x-hex", s, parts[1])
	}
	a, err := netip.ParseAddr(parts[2])
	if err != nil || !a.Is6() || a.Is4In6() {
		return FabricMember{}, fmt.Errorf("fabric member %q: fabric address %q: give an IPv6 address", s, parts[2])
	}
	return FabricMember{NS: parts[0], HostID: uint32(host), Addr: a}, nil
}

func (f *Fabric) validate() error {
	if err := validNSName(f.BridgeNS); err != nil {
		return fmt.Errorf("fabric bridge: %w", err)
	}
	if !f.Prefix.IsValid() || !f.Prefix.Addr().Is6() || f.Prefix.Bits() > 120 {
		return fmt.Errorf("fabric prefix %v: give an IPv6 prefix such as fd00:fe::/64", f.Prefix)
	}
	seenNS := map[string]bool{}
	seenHost := map[uint32]bool{}
	seenMAC := map[string]string{}
	for _, m := range f.Members {
		if err := validNSName(m.NS); err != nil {
			return fmt.Errorf("fabric member: %w", err)
		}
		if m.NS == f.BridgeNS || seenNS[m.NS] {
			return fmt.Errorf("fabric member %q listed twice or equal to the bridge namespace", m.NS)
		}
		seenNS[m.NS] = true
		if m.HostID != 0 && seenHost[m.HostID] {
			return fmt.Errorf("fabric: host id %d used by two members", m.HostID)
		}
		seenHost[m.HostID] = m.HostID != 0
		if !f.Prefix.Contains(m.Addr) || m.Addr == f.Prefix.Masked().Addr() {
			return fmt.Errorf("fabric member %s: address %v is not a host address in %v", m.NS, m.Addr, f.Prefix)
		}
		if other, dup := seenMAC[fabricMAC(m.Addr).String()]; dup {
			return fmt.Errorf("fabric members %s and %s: addresses hash to the same MAC; pick another address", other, m.NS)
		}
		seenMAC[fabricMAC(m.Addr).String()] = m.NS
	}
	return nil
}

// Member returns the member with the given host id.
func (f *Fabric) Member(hostID uint32) (FabricMember, bool) {
	for _, m := range f.Members {
		if m.HostID == hostID && hostID != 0 {
			return m, true
		}
	}
	return FabricMember{}, false
}

// fabricMAC is a member's fabric MAC, derived from its fabric address so a
// re-created link keeps the neighbor entries the others pinned.
func fabricMAC(a netip.Addr) net.HardwareAddr {
	h := fnv.New32a()
	b := a.As16()
	h.Write(b[:])
	v := h.Sum32()
	return net.HardwareAddr{0x02, 0xfd, byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}
}

func bridgePortName(ns string) string {
	h := fnv.New32a()
	h.Write([]byte(ns))
	return fmt.Sprintf("fb%08x", h.Sum32())
}

// Connect creates or repairs the fabric: the bridge namespace and bridge, each
// member's namespace, veth, fabric address, and IPv6 forwarding on members
// that host machines. Idempotent.
func (f *Fabric) Connect(ctx context.Context, log zerolog.Logger) error {
	if err := f.validate(); err != nil {
		return err
	}
	if err := CheckPrivileges(); err != nil {
		return err
	}
	if err := EnsureNamespace(f.BridgeNS); err != nil {
		return err
	}
	if err := withHandle(f.BridgeNS, func(h *netlink.Handle) error {
		br, err := h.LinkByName("br0")
		if isNotFound(err) {
			// No multicast snooping: nothing on the fabric sends MLD queries,
			// and neighbor discovery must reach every member at once.
			snoop := false
			if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}, MulticastSnooping: &snoop}); err != nil {
				return privErr(fmt.Errorf("creating fabric bridge: %w", err))
			}
			br, err = h.LinkByName("br0")
		}
		if err != nil {
			return fmt.Errorf("fabric bridge: %w", err)
		}
		return h.LinkSetUp(br)
	}); err != nil {
		return err
	}
	for _, m := range f.Members {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := f.connectMember(m); err != nil {
			return fmt.Errorf("fabric member %s: %w", m.NS, err)
		}
	}
	if err := f.pinNeighbors(); err != nil {
		return err
	}
	log.Debug().Str("bridge_ns", f.BridgeNS).Int("members", len(f.Members)).Msg("fabric connected")
	return nil
}

func (f *Fabric) connectMember(m FabricMember) error {
	if err := EnsureNamespace(m.NS); err != nil {
		return err
	}
	if m.HostID != 0 {
		if err := sysctlInNS(m.NS, "net.ipv6.conf.all.forwarding", "1"); err != nil {
			return err
		}
	}
	port := bridgePortName(m.NS)
	memberHasIf := withHandle(m.NS, func(h *netlink.Handle) error {
		_, err := h.LinkByName(FabricIf)
		return err
	}) == nil
	portExists := withHandle(f.BridgeNS, func(h *netlink.Handle) error {
		_, err := h.LinkByName(port)
		return err
	}) == nil
	if memberHasIf && !portExists {
		// Its other end went with a deleted bridge namespace (the kernel
		// frees that asynchronously): remove it now and start over.
		if err := withHandle(m.NS, func(h *netlink.Handle) error {
			link, err := h.LinkByName(FabricIf)
			if err != nil {
				return nil
			}
			return privErr(deleteLink(h, link))
		}); err != nil {
			return fmt.Errorf("removing stale %s: %w", FabricIf, err)
		}
		memberHasIf = false
	}
	if err := withHandle(f.BridgeNS, func(h *netlink.Handle) error {
		link, err := h.LinkByName(port)
		if err == nil && !memberHasIf {
			if err := deleteLink(h, link); err != nil {
				return privErr(fmt.Errorf("removing stale port %s: %w", port, err))
			}
			err = netlink.LinkNotFoundError{}
		}
		if err != nil && !isNotFound(err) {
			return err
		}
		if err != nil {
			if memberHasIf {
				return fmt.Errorf("%s exists without its bridge port %s; delete it", FabricIf, port)
			}
			mns, err := openNS(m.NS)
			if err != nil {
				return err
			}
			defer mns.Close()
			veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: port}, PeerName: FabricIf,
				PeerNamespace: netlink.NsFd(int(mns)), PeerHardwareAddr: fabricMAC(m.Addr)}
			if err := h.LinkAdd(veth); err != nil {
				return privErr(fmt.Errorf("creating veth %s <-> %s/%s: %w", port, m.NS, FabricIf, err))
			}
			if link, err = h.LinkByName(port); err != nil {
				return err
			}
		}
		br, err := h.LinkByName("br0")
		if err != nil {
			return err
		}
		if link.Attrs().MasterIndex != br.Attrs().Index {
			if err := h.LinkSetMaster(link, br); err != nil {
				return privErr(fmt.Errorf("attaching %s to the bridge: %w", port, err))
			}
		}
		return privErr(h.LinkSetUp(link))
	}); err != nil {
		return err
	}
	// The bridge forwards through the port's own queue, which drops packets
	// until the port too is operationally up; addresses wait for the link
	// (see linkUp).
	if err := linkUp(m.NS, FabricIf); err != nil {
		return err
	}
	if err := waitOperUpIn(m.NS, FabricIf); err != nil {
		return err
	}
	if err := waitOperUpIn(f.BridgeNS, port); err != nil {
		return err
	}
	return withHandle(m.NS, func(h *netlink.Handle) error {
		link, err := h.LinkByName(FabricIf)
		if err != nil {
			return err
		}
		// A fixed link-local derived from the fabric address (fe80::<low 64
		// bits>): stable across re-creation.
		b := m.Addr.As16()
		copy(b[:8], []byte{0xfe, 0x80, 0, 0, 0, 0, 0, 0})
		if err := ensureAddr(h, link, netip.PrefixFrom(netip.AddrFrom16(b), 64), false); err != nil {
			return err
		}
		return ensureAddr(h, link, netip.PrefixFrom(m.Addr, f.Prefix.Bits()), false)
	})
}

// pinNeighbors gives every member a permanent neighbor entry for every other
// member's fabric address. The fabric then needs no neighbor discovery, like
// the point-to-point tunnels of a real 6PN: no packet waits for a
// solicitation, and a lost one cannot stall a path for NDP's 1 s retransmit.
func (f *Fabric) pinNeighbors() error {
	macs := make(map[string]net.HardwareAddr, len(f.Members))
	for _, m := range f.Members {
		err := withHandle(m.NS, func(h *netlink.Handle) error {
			link, err := h.LinkByName(FabricIf)
			if err != nil {
				return err
			}
			macs[m.NS] = link.Attrs().HardwareAddr
			return nil
		})
		if err != nil {
			return fmt.Errorf("fabric member %s: %w", m.NS, err)
		}
	}
	for _, from := range f.Members {
		err := withHandle(from.NS, func(h *netlink.Handle) error {
			link, err := h.LinkByName(FabricIf)
			if err != nil {
				return err
			}
			for _, to := range f.Members {
				if to.NS == from.NS {
					continue
				}
				if err := pinNeighbor(h, link, to.Addr, macs[to.NS]); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("fabric member %s: %w", from.NS, err)
		}
	}
	return nil
}

// pinNeighbor sets a permanent neighbor entry ip -> mac on link. ferry pins
// every neighbor on the paths it builds (fabric, machine veths): a freshly
// added address joins its solicited-node group asynchronously (the kernel
// does it from a work queue that waits for the RTNL lock), so a neighbor
// solicitation sent right after setup or cutover can be dropped and the path
// then stalls for NDP's 1 s retransmit. Seen in tests under load; pinned
// entries remove the race and take NDP off the cutover's critical path.
func pinNeighbor(h *netlink.Handle, link netlink.Link, ip netip.Addr, mac net.HardwareAddr) error {
	n := &netlink.Neigh{
		LinkIndex:    link.Attrs().Index,
		Family:       netlink.FAMILY_V6,
		State:        netlink.NUD_PERMANENT,
		IP:           ip.AsSlice(),
		HardwareAddr: mac,
	}
	if err := h.NeighSet(n); err != nil {
		return privErr(fmt.Errorf("neighbor %s on %s: %w", ip, link.Attrs().Name, err))
	}
	return nil
}

// RouteOrg makes every member route org's 6PN prefix of every other worker
// (fdaa:ORG:HOST::/80) to that worker's fabric address (proto 156).
// Idempotent; call it once per org network the workers serve.
func (f *Fabric) RouteOrg(ctx context.Context, log zerolog.Logger, org uint32) error {
	if err := f.validate(); err != nil {
		return err
	}
	if err := CheckPrivileges(); err != nil {
		return err
	}
	for _, from := range f.Members {
		err := withHandle(from.NS, func(h *netlink.Handle) error {
			link, err := h.LinkByName(FabricIf)
			if err != nil {
				return fmt.Errorf("%s not connected to the fabric (run Connect): %w", from.NS, err)
			}
			for _, to := range f.Members {
				if to.HostID == 0 || to.NS == from.NS {
					continue
				}
				p, err := HostPrefix(org, to.HostID)
				if err != nil {
					return err
				}
				r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(p), Gw: to.Addr.AsSlice(), Protocol: ProtoMachine}
				if err := h.RouteReplace(r); err != nil {
					return privErr(fmt.Errorf("route %s via %s: %w", p, to.Addr, err))
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("fabric routes of org %d on %s: %w", org, from.NS, err)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
	log.Debug().Uint32("org", org).Msg("fabric routes installed")
	return nil
}

// ConnectWorkers is Connect followed by RouteOrg for each org: the whole
// fabric of a demo or test in one idempotent call.
func ConnectWorkers(ctx context.Context, log zerolog.Logger, f *Fabric, orgs ...uint32) error {
	if err := f.Connect(ctx, log); err != nil {
		return err
	}
	for _, org := range orgs {
		if err := f.RouteOrg(ctx, log, org); err != nil {
			return err
		}
	}
	return nil
}

// Teardown deletes the bridge namespace; the member ends of the veths, and
// the routes through them, go with it. Member namespaces are kept.
func (f *Fabric) Teardown(ctx context.Context, log zerolog.Logger) error {
	if err := validNSName(f.BridgeNS); err != nil {
		return err
	}
	var errs []error
	for _, m := range f.Members {
		if !NamespaceExists(m.NS) {
			continue
		}
		errs = append(errs, withHandle(m.NS, func(h *netlink.Handle) error {
			link, err := h.LinkByName(FabricIf)
			if err != nil {
				return nil
			}
			return privErr(deleteLink(h, link))
		}))
	}
	errs = append(errs, DeleteNamespace(f.BridgeNS))
	log.Debug().Str("bridge_ns", f.BridgeNS).Msg("fabric removed")
	return errors.Join(errs...)
}
