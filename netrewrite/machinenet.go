package netrewrite

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"time"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Route protocol numbers ferry stamps on the routes it installs, so listing
// and cleanup touch only ferry's routes (`ip -6 route` shows them as
// "proto 156"/"proto 157"). Values above 99 are free for private use.
const (
	// ProtoMachine marks the /128 of a machine on its own worker.
	ProtoMachine netlink.RouteProtocol = 156
	// ProtoMapping marks a grace-period route of an old address.
	ProtoMapping netlink.RouteProtocol = 157
)

// GatewayLL is the link-local address of the worker end of every machine
// veth; the machine's default route points at it. Fixed, so the machine's
// routing is the same on every worker and needs no DAD or router discovery.
var GatewayLL = netip.MustParseAddr("fe80::1")

// MachineLL is the link-local address of the machine end. Both ends get
// fixed link-locals and no kernel-generated ones (addr_gen_mode none), so a
// veth's addresses never depend on its random MAC or on DAD timing and
// snapshots of the kernel state compare equal across re-applies.
var MachineLL = netip.MustParseAddr("fe80::2")

// Fixed MAC addresses of the two ends of every machine veth (locally
// administered). Each pair is its own two-node link, so the same pair of
// addresses on every machine is fine (Calico does the same), and a veth
// re-created after a crash has the same neighbor entries as before.
var (
	HostVethMAC = net.HardwareAddr{0x02, 0xfe, 0, 0, 0, 0x01}
	MachineMAC  = net.HardwareAddr{0x02, 0xfe, 0, 0, 0, 0x02}
)

// DefaultMachineIf is the interface name inside the machine's namespace.
const DefaultMachineIf = "eth0"

// MachineNet describes the network of one machine: its namespace attached to
// its worker's namespace by a veth pair, its 6PN address on the machine end,
// and the worker routing that /128 to the veth.
type MachineNet struct {
	WorkerNS  string `json:"worker_ns"`            // "" = this process's namespace
	MachineNS string `json:"machine_ns"`           // created if missing
	HostVeth  string `json:"host_veth,omitempty"`  // worker end; default DefaultVethName(Addr)
	MachineIf string `json:"machine_if,omitempty"` // machine end; default "eth0"
	Addr      Addr   `json:"addr"`
}

// DefaultVethName is the worker-end veth name for a machine: stable for the
// machine across workers (org and machine id, not the host), 10 characters.
func DefaultVethName(a Addr) string {
	h := fnv.New32a()
	fmt.Fprintf(h, "%d/%d", a.Org(), a.Machine())
	return fmt.Sprintf("fm%08x", h.Sum32())
}

func (m MachineNet) withDefaults() (MachineNet, error) {
	if !m.Addr.IsValid() {
		return m, fmt.Errorf("machine network: %w: no address", ErrBadAddr)
	}
	if m.MachineNS == "" {
		return m, errors.New("machine network: MachineNS is empty; name the machine's network namespace")
	}
	if m.MachineNS == m.WorkerNS {
		return m, fmt.Errorf("machine network: machine and worker namespaces are both %q", m.MachineNS)
	}
	if m.HostVeth == "" {
		m.HostVeth = DefaultVethName(m.Addr)
	}
	if m.MachineIf == "" {
		m.MachineIf = DefaultMachineIf
	}
	for _, n := range []string{m.HostVeth, m.MachineIf} {
		if len(n) > unix.IFNAMSIZ-1 || n == "lo" {
			return m, fmt.Errorf("machine network: interface name %q: at most 15 characters, not lo", n)
		}
	}
	if err := validNSName(m.MachineNS); err != nil {
		return m, err
	}
	if m.WorkerNS != "" {
		if err := validNSName(m.WorkerNS); err != nil {
			return m, err
		}
	}
	return m, nil
}

func addrFor(p netip.Prefix) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// SetupMachineNet creates or repairs the machine's network: namespace, veth
// pair, gateway link-local on the worker end, address and default route on
// the machine end, the worker's /128 route (proto 156) and IPv6 forwarding
// in the worker namespace. Idempotent: applying it again changes nothing.
func SetupMachineNet(ctx context.Context, log zerolog.Logger, m MachineNet) error {
	m, err := m.withDefaults()
	if err != nil {
		return err
	}
	if err := CheckPrivileges(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := EnsureNamespace(m.MachineNS); err != nil {
		return err
	}
	if err := sysctlInNS(m.WorkerNS, "net.ipv6.conf.all.forwarding", "1"); err != nil {
		return err
	}
	if err := ensureVeth(m); err != nil {
		return err
	}
	// Both ends up and carrying traffic before any address is added: see
	// linkUp. Re-applying on a live machine finds both up at once.
	if err := linkUp(m.MachineNS, m.MachineIf); err != nil {
		return err
	}
	if err := linkUp(m.WorkerNS, m.HostVeth); err != nil {
		return err
	}
	if err := waitOperUpIn(m.WorkerNS, m.HostVeth); err != nil {
		return err
	}
	if err := waitOperUpIn(m.MachineNS, m.MachineIf); err != nil {
		return err
	}
	// Each end gets a permanent neighbor entry for the other (see
	// pinNeighbor): no neighbor discovery on the machine's path.
	hostMAC, err := linkMAC(m.WorkerNS, m.HostVeth)
	if err != nil {
		return err
	}
	machineMAC, err := linkMAC(m.MachineNS, m.MachineIf)
	if err != nil {
		return err
	}
	if err := withHandle(m.MachineNS, func(h *netlink.Handle) error {
		link, err := h.LinkByName(m.MachineIf)
		if err != nil {
			return fmt.Errorf("machine interface %s in %s: %w", m.MachineIf, m.MachineNS, err)
		}
		if err := pinNeighbor(h, link, GatewayLL, hostMAC); err != nil {
			return err
		}
		if err := ensureAddr(h, link, netip.PrefixFrom(MachineLL, 64), false); err != nil {
			return fmt.Errorf("%s in %s: %w", m.MachineIf, m.MachineNS, err)
		}
		if err := ensureAddr(h, link, m.Addr.Prefix(), false); err != nil {
			return fmt.Errorf("machine %s in %s: %w", m.Addr, m.MachineNS, err)
		}
		def := &netlink.Route{
			LinkIndex: link.Attrs().Index,
			Dst:       ipNet(netip.PrefixFrom(netip.IPv6Unspecified(), 0)),
			Gw:        GatewayLL.AsSlice(),
			Protocol:  ProtoMachine,
		}
		if err := h.RouteReplace(def); err != nil {
			return privErr(fmt.Errorf("default route of %s in %s: %w", m.Addr, m.MachineNS, err))
		}
		return nil
	}); err != nil {
		return err
	}
	if err := withHandle(m.WorkerNS, func(h *netlink.Handle) error {
		link, err := h.LinkByName(m.HostVeth)
		if err != nil {
			return fmt.Errorf("worker veth %s: %w", m.HostVeth, err)
		}
		if err := ensureAddr(h, link, netip.PrefixFrom(GatewayLL, 64), false); err != nil {
			return fmt.Errorf("gateway on %s: %w", m.HostVeth, err)
		}
		if err := pinNeighbor(h, link, m.Addr.IP(), machineMAC); err != nil {
			return err
		}
		return replaceDevRoute(h, link, m.Addr.Prefix(), ProtoMachine)
	}); err != nil {
		return err
	}
	log.Debug().Str("addr", m.Addr.String()).Str("worker_ns", m.WorkerNS).Str("machine_ns", m.MachineNS).
		Str("veth", m.HostVeth).Msg("machine network ready")
	return nil
}

// linkUp turns off kernel link-local generation on the named link and
// brings it up. Addresses are added only once the link is operationally up:
// the kernel holds back address setup (including joining the address's
// solicited-node multicast group) while a link is not ready, and a nodad
// address added in that window may never answer neighbor solicitations.
func linkUp(ns, name string) error {
	return withHandle(ns, func(h *netlink.Handle) error {
		link, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("interface %s in %q: %w", name, ns, err)
		}
		if err := h.LinkSetIP6AddrGenMode(link, 1 /* IN6_ADDR_GEN_MODE_NONE */); err != nil {
			return privErr(fmt.Errorf("addr_gen_mode none on %s: %w", name, err))
		}
		if err := h.LinkSetUp(link); err != nil {
			return privErr(fmt.Errorf("bringing up %s: %w", name, err))
		}
		return nil
	})
}

// linkMAC is the hardware address of the named link in ns.
func linkMAC(ns, name string) (net.HardwareAddr, error) {
	var mac net.HardwareAddr
	err := withHandle(ns, func(h *netlink.Handle) error {
		link, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("interface %s in %q: %w", name, ns, err)
		}
		mac = link.Attrs().HardwareAddr
		return nil
	})
	return mac, err
}

// unpinNeighbor removes the permanent neighbor entry of ip on the named
// link, if link and entry exist.
func unpinNeighbor(h *netlink.Handle, ifname string, ip netip.Addr) error {
	link, err := h.LinkByName(ifname)
	if err != nil {
		if isNotFound(err) {
			return nil
		}
		return fmt.Errorf("looking up %s: %w", ifname, err)
	}
	n := &netlink.Neigh{LinkIndex: link.Attrs().Index, Family: netlink.FAMILY_V6, IP: ip.AsSlice()}
	if err := h.NeighDel(n); err != nil && !errors.Is(err, unix.ENOENT) {
		return privErr(fmt.Errorf("removing neighbor %s on %s: %w", ip, ifname, err))
	}
	return nil
}

func waitOperUpIn(ns, name string) error {
	return withHandle(ns, func(h *netlink.Handle) error { return waitOperUp(h, name) })
}

// operUpTimeout bounds the wait for a new link to carry traffic.
const operUpTimeout = 3 * time.Second

// waitOperUp waits until the kernel reports the link operationally up. A
// new veth drops every packet until the kernel's link watcher has processed
// its carrier change, which it may batch for up to a second; returning
// before that would make the first packets after a cutover vanish.
func waitOperUp(h *netlink.Handle, name string) error {
	deadline := time.Now().Add(operUpTimeout)
	for {
		link, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("waiting for %s: %w", name, err)
		}
		if link.Attrs().OperState == netlink.OperUp {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s is not operationally up after %v (state %s): check that both ends of the veth are up",
				name, operUpTimeout, link.Attrs().OperState)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// ensureVeth makes sure the worker end exists in the worker namespace and its
// peer is MachineIf in the machine namespace; a half-broken pair (one end
// gone with a deleted namespace) is deleted and recreated.
func ensureVeth(m MachineNet) error {
	peerOK := withHandle(m.MachineNS, func(h *netlink.Handle) error {
		_, err := h.LinkByName(m.MachineIf)
		return err
	}) == nil
	return withHandle(m.WorkerNS, func(h *netlink.Handle) error {
		link, err := h.LinkByName(m.HostVeth)
		if err == nil {
			if _, isVeth := link.(*netlink.Veth); isVeth && peerOK {
				return nil
			}
			if err := deleteLink(h, link); err != nil {
				return privErr(fmt.Errorf("removing stale %s: %w", m.HostVeth, err))
			}
		} else if !isNotFound(err) {
			return fmt.Errorf("looking up %s: %w", m.HostVeth, err)
		}
		if peerOK {
			// MachineIf exists without our worker end: not ours to reuse.
			return fmt.Errorf("interface %s already exists in %s without its worker end %s; delete it or the namespace",
				m.MachineIf, m.MachineNS, m.HostVeth)
		}
		mns, err := openNS(m.MachineNS)
		if err != nil {
			return err
		}
		defer mns.Close()
		veth := &netlink.Veth{
			LinkAttrs:        netlink.LinkAttrs{Name: m.HostVeth, HardwareAddr: HostVethMAC},
			PeerName:         m.MachineIf,
			PeerNamespace:    netlink.NsFd(int(mns)),
			PeerHardwareAddr: MachineMAC,
		}
		if err := h.LinkAdd(veth); err != nil {
			return privErr(fmt.Errorf("creating veth %s <-> %s/%s: %w", m.HostVeth, m.MachineNS, m.MachineIf, err))
		}
		return nil
	})
}

// deleteLink deletes link, counting a link already gone as deleted: a
// deleted namespace takes a veth's other end down in the kernel's deferred
// netns cleanup, which can win the race between a lookup and this delete.
func deleteLink(h *netlink.Handle, link netlink.Link) error {
	if err := h.LinkDel(link); err != nil && !isNotFound(err) {
		return err
	}
	return nil
}

func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}

// ensureAddr adds p to link without DAD (the address is usable at once; the
// fabric is ours, duplicates are prevented by the registry). deprecated sets
// preferred_lft 0: the address still receives, but new outgoing connections
// pick another source address.
func ensureAddr(h *netlink.Handle, link netlink.Link, p netip.Prefix, deprecated bool) error {
	a := addrFor(p)
	a.Flags = unix.IFA_F_NODAD
	if deprecated {
		a.PreferedLft = 0
		a.ValidLft = 0xffffffff // forever; only preferred is 0
	}
	existing, err := retryDump(func() ([]netlink.Addr, error) { return h.AddrList(link, netlink.FAMILY_V6) })
	if err != nil {
		return fmt.Errorf("listing addresses: %w", err)
	}
	present := false
	for _, e := range existing {
		if e.IPNet.String() == a.IPNet.String() {
			isDeprecated := e.PreferedLft == 0 && e.ValidLft != 0
			present = e.Flags&unix.IFA_F_NODAD != 0 && isDeprecated == deprecated
		}
	}
	if !present {
		if err := h.AddrReplace(link, a); err != nil {
			return privErr(fmt.Errorf("adding %s: %w", p, err))
		}
	}
	return waitAddrReady(h, link, p.Addr())
}

// waitAddrReady waits for the local route of a just-added address. The
// kernel finishes setting up an address (its local route, its
// solicited-node multicast group) from a work queue that waits for the RTNL
// lock; until then packets to the address are not delivered. Seen taking
// long enough under load that a snapshot taken right after setup missed the
// local routes.
func waitAddrReady(h *netlink.Handle, link netlink.Link, ip netip.Addr) error {
	filter := &netlink.Route{Table: unix.RT_TABLE_LOCAL, Dst: ipNet(netip.PrefixFrom(ip, 128)), LinkIndex: link.Attrs().Index}
	deadline := time.Now().Add(operUpTimeout)
	for {
		routes, err := retryDump(func() ([]netlink.Route, error) {
			return h.RouteListFiltered(netlink.FAMILY_V6, filter, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_DST|netlink.RT_FILTER_OIF)
		})
		if err != nil {
			return fmt.Errorf("waiting for %s on %s: %w", ip, link.Attrs().Name, err)
		}
		if len(routes) > 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("address %s on %s not ready after %v (no local route); check `ip -6 addr show dev %s`",
				ip, link.Attrs().Name, operUpTimeout, link.Attrs().Name)
		}
		time.Sleep(time.Millisecond)
	}
}

// removeAddr deletes p from the named link if it is there.
func removeAddr(h *netlink.Handle, ifname string, p netip.Prefix) error {
	link, err := h.LinkByName(ifname)
	if err != nil {
		if isNotFound(err) {
			return nil
		}
		return fmt.Errorf("looking up %s: %w", ifname, err)
	}
	if err := h.AddrDel(link, addrFor(p)); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) {
		return privErr(fmt.Errorf("removing %s from %s: %w", p, ifname, err))
	}
	return nil
}

func replaceDevRoute(h *netlink.Handle, link netlink.Link, dst netip.Prefix, proto netlink.RouteProtocol) error {
	r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(dst), Protocol: proto}
	if err := h.RouteReplace(r); err != nil {
		return privErr(fmt.Errorf("route %s dev %s: %w", dst, link.Attrs().Name, err))
	}
	return nil
}

// deleteRoutes removes the main-table routes to exactly dst whose protocol is
// proto; other routes to dst (not ferry's) are left alone.
func deleteRoutes(h *netlink.Handle, dst netip.Prefix, proto netlink.RouteProtocol) error {
	routes, err := retryDump(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Dst: ipNet(dst), Protocol: proto},
			netlink.RT_FILTER_DST|netlink.RT_FILTER_PROTOCOL)
	})
	if err != nil {
		return fmt.Errorf("listing routes to %s: %w", dst, err)
	}
	for i := range routes {
		if err := h.RouteDel(&routes[i]); err != nil && !errors.Is(err, unix.ESRCH) {
			return privErr(fmt.Errorf("removing route to %s: %w", dst, err))
		}
	}
	return nil
}

// TeardownMachineNet removes what SetupMachineNet made: the veth pair (and
// with it the /128 route) and the machine namespace. Missing pieces are fine.
func TeardownMachineNet(ctx context.Context, log zerolog.Logger, m MachineNet) error {
	m, err := m.withDefaults()
	if err != nil {
		return err
	}
	if err := CheckPrivileges(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := withHandle(m.WorkerNS, func(h *netlink.Handle) error {
		if err := deleteRoutes(h, m.Addr.Prefix(), ProtoMachine); err != nil {
			return err
		}
		link, err := h.LinkByName(m.HostVeth)
		if err != nil {
			if isNotFound(err) {
				return nil
			}
			return fmt.Errorf("looking up %s: %w", m.HostVeth, err)
		}
		if err := deleteLink(h, link); err != nil {
			return privErr(fmt.Errorf("deleting %s: %w", m.HostVeth, err))
		}
		return nil
	}); err != nil {
		return err
	}
	if err := DeleteNamespace(m.MachineNS); err != nil {
		return err
	}
	log.Debug().Str("addr", m.Addr.String()).Str("machine_ns", m.MachineNS).Msg("machine network removed")
	return nil
}
