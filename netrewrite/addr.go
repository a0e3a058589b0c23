// Package netrewrite gives a machine's private IPv6 (6PN) address and moves it
// with the machine: it builds and parses 6PN addresses, sets up the network of
// a machine (a network namespace behind a veth on its worker), and at
// migration cutover rewrites the addresses and routes on the target and the
// source so that the old address keeps working for a grace period.
//
// A 6PN address is fdaa:ORG(32):HOST(32):MACHINE(32):0000 — the org network,
// the worker the machine runs on, the machine, and 16 free bits. Because the
// worker is part of the address, a migrated machine gets a new address.
package netrewrite

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// Prefix6PN is the /16 every 6PN address lives in.
var Prefix6PN = netip.MustParsePrefix("fdaa::/16")

// ErrBadAddr is wrapped by every error about a malformed 6PN address.
var ErrBadAddr = errors.New("bad 6PN address")

// Addr is a validated 6PN address. The zero Addr is invalid (IsValid false).
type Addr struct{ ip netip.Addr }

// Build makes the 6PN address of machine in org network org on worker host.
// Zero ids are refused: zero is "unset" in the registry, never a real id.
func Build(org, host, machine uint32) (Addr, error) {
	var zero []string
	if org == 0 {
		zero = append(zero, "org")
	}
	if host == 0 {
		zero = append(zero, "host")
	}
	if machine == 0 {
		zero = append(zero, "machine")
	}
	if len(zero) > 0 {
		return Addr{}, fmt.Errorf("%w: %s id must be nonzero (ids come from the registry)", ErrBadAddr, strings.Join(zero, ", "))
	}
	var b [16]byte
	b[0], b[1] = 0xfd, 0xaa
	binary.BigEndian.PutUint32(b[2:6], org)
	binary.BigEndian.PutUint32(b[6:10], host)
	binary.BigEndian.PutUint32(b[10:14], machine)
	return Addr{netip.AddrFrom16(b)}, nil
}

// MustBuild is Build for constants in tests and examples; it panics on bad ids.
func MustBuild(org, host, machine uint32) Addr {
	a, err := Build(org, host, machine)
	if err != nil {
		panic(err)
	}
	return a
}

// Parse reads a 6PN address in any IPv6 text form ("fdaa:0:1:0:2:0:3::").
// A prefix length, a zone, an IPv4 form, an address outside fdaa::/16, zero
// ids or nonzero free bits are errors.
func Parse(s string) (Addr, error) {
	if strings.Contains(s, "/") {
		return Addr{}, fmt.Errorf("%w %q: give an address, not a prefix", ErrBadAddr, s)
	}
	ip, err := netip.ParseAddr(s)
	if err != nil {
		return Addr{}, fmt.Errorf("%w %q: %v", ErrBadAddr, s, err)
	}
	return FromIP(ip)
}

// FromIP validates ip as a 6PN address.
func FromIP(ip netip.Addr) (Addr, error) {
	switch {
	case !ip.IsValid():
		return Addr{}, fmt.Errorf("%w: empty address", ErrBadAddr)
	case ip.Zone() != "":
		return Addr{}, fmt.Errorf("%w %q: a 6PN address has no zone", ErrBadAddr, ip)
	case ip.Is4() || ip.Is4In6():
		return Addr{}, fmt.Errorf("%w %q: IPv4 address; 6PN addresses are IPv6 in fdaa::/16", ErrBadAddr, ip)
	case !Prefix6PN.Contains(ip):
		return Addr{}, fmt.Errorf("%w %q: not in fdaa::/16", ErrBadAddr, ip)
	}
	b := ip.As16()
	if b[14] != 0 || b[15] != 0 {
		return Addr{}, fmt.Errorf("%w %q: the low 16 bits are reserved and must be zero", ErrBadAddr, ip)
	}
	a, err := Build(binary.BigEndian.Uint32(b[2:6]), binary.BigEndian.Uint32(b[6:10]), binary.BigEndian.Uint32(b[10:14]))
	if err != nil {
		return Addr{}, fmt.Errorf("%q: %w", ip, err)
	}
	return a, nil
}

func (a Addr) field(i int) uint32 {
	b := a.ip.As16()
	return binary.BigEndian.Uint32(b[i : i+4])
}

// Org is the 32-bit org network id.
func (a Addr) Org() uint32 { return a.field(2) }

// Host is the 32-bit id of the worker the address belongs to.
func (a Addr) Host() uint32 { return a.field(6) }

// Machine is the 32-bit machine id.
func (a Addr) Machine() uint32 { return a.field(10) }

// IsValid reports whether a was built or parsed (the zero Addr is not).
func (a Addr) IsValid() bool { return a.ip.IsValid() }

// IP is the address as a netip.Addr.
func (a Addr) IP() netip.Addr { return a.ip }

// Prefix is the /128 of the address.
func (a Addr) Prefix() netip.Prefix { return netip.PrefixFrom(a.ip, 128) }

// String is the canonical RFC 5952 text (Build(1, 2, 3) is "fdaa:0:1:0:2:0:3:0"),
// or "invalid 6PN" for the zero Addr.
func (a Addr) String() string {
	if !a.ip.IsValid() {
		return "invalid 6PN"
	}
	return a.ip.String()
}

// WithHost is the address of the same machine on another worker: the address
// a migration gives it on the target.
func (a Addr) WithHost(host uint32) (Addr, error) {
	if !a.IsValid() {
		return Addr{}, fmt.Errorf("%w: empty address", ErrBadAddr)
	}
	return Build(a.Org(), host, a.Machine())
}

// MarshalText writes the canonical text; the zero Addr marshals as "".
func (a Addr) MarshalText() ([]byte, error) {
	if !a.IsValid() {
		return []byte{}, nil
	}
	return []byte(a.ip.String()), nil
}

// UnmarshalText parses with Parse; "" gives the zero Addr.
func (a *Addr) UnmarshalText(b []byte) error {
	if len(b) == 0 {
		*a = Addr{}
		return nil
	}
	p, err := Parse(string(b))
	if err != nil {
		return err
	}
	*a = p
	return nil
}

// HostPrefix is the /80 holding every 6PN address of org on worker host: what
// the other workers route towards that worker.
func HostPrefix(org, host uint32) (netip.Prefix, error) {
	a, err := Build(org, host, 1)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a.ip, 80).Masked(), nil
}
