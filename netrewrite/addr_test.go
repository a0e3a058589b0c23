package netrewrite

import (
	"encoding/json"
	"errors"
	"net/netip"
	"testing"
)

func TestBuildParseRoundTrip(t *testing.T) {
	a, err := Build(0xdeadbeef, 0x0000000b, 0x12345678)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := a.String(), "fdaa:dead:beef:0:b:1234:5678:0"; got != want {
		t.Fatalf("String = %s, want %s", got, want)
	}
	if a.Org() != 0xdeadbeef || a.Host() != 0xb || a.Machine() != 0x12345678 {
		t.Fatalf("fields = %x %x %x", a.Org(), a.Host(), a.Machine())
	}
	for _, s := range []string{"fdaa:dead:beef:0:b:1234:5678:0", "FDAA:DEAD:BEEF:0000:000B:1234:5678:0000", "fdaa:dead:beef:0:b:1234:5678::"} {
		p, err := Parse(s)
		if err != nil || p != a {
			t.Fatalf("Parse(%q) = %v, %v; want %v", s, p, err, a)
		}
	}
	b, _ := a.WithHost(7)
	if b.Host() != 7 || b.Org() != a.Org() || b.Machine() != a.Machine() {
		t.Fatalf("WithHost: %v", b)
	}
	p, _ := HostPrefix(0xdeadbeef, 0xb)
	if p.String() != "fdaa:dead:beef:0:b::/80" || !p.Contains(a.IP()) || p.Contains(b.IP()) {
		t.Fatalf("HostPrefix = %v", p)
	}
	js, _ := json.Marshal(struct{ A Addr }{a})
	var back struct{ A Addr }
	if err := json.Unmarshal(js, &back); err != nil || back.A != a {
		t.Fatalf("JSON round trip %s: %v %v", js, back.A, err)
	}
}

func TestBadAddresses(t *testing.T) {
	bad := map[string]string{
		"":                         "empty",
		"fdab:0:1:0:2:0:3:0":       "not in fdaa::/16",
		"fe80::1":                  "link-local",
		"10.1.2.3":                 "IPv4",
		"::ffff:10.1.2.3":          "v4-mapped",
		"fdaa:0:1:0:2:0:3:0/128":   "prefix",
		"fdaa:0:1:0:2:0:3:0%eth0":  "zone",
		"fdaa:0:1:0:2:0:3:1":       "low bits",
		"fdaa:0:0:0:2:0:3:0":       "zero org",
		"fdaa:0:1:0:0:0:3:0":       "zero host",
		"fdaa:0:1:0:2:0:0:0":       "zero machine",
		"fdaa:0:1:0:2:0:3":         "too short",
		"fdaa:0:1:0:2:0:3:0:0":     "too long",
		"fdaa:0:1:0:2:0:3:00000":   "group too long",
		"fdaa::1::2":               "two ::",
		"fdaa:0:1:0:2:0:3:0 ":      "trailing space",
		"[fdaa:0:1:0:2:0:3:0]":     "brackets",
		"fdaa:0:1:0:2:0:3:0:7000x": "garbage",
	}
	for s, why := range bad {
		a, err := Parse(s)
		if err == nil {
			t.Errorf("Parse(%q) (%s) = %v, want error", s, why, a)
			continue
		}
		if !errors.Is(err, ErrBadAddr) {
			t.Errorf("Parse(%q): %v does not wrap ErrBadAddr", s, err)
		}
	}
	for _, ids := range [][3]uint32{{0, 1, 1}, {1, 0, 1}, {1, 1, 0}, {0, 0, 0}} {
		if _, err := Build(ids[0], ids[1], ids[2]); !errors.Is(err, ErrBadAddr) {
			t.Errorf("Build%v: %v", ids, err)
		}
	}
	if _, err := (Addr{}).WithHost(1); err == nil {
		t.Error("zero Addr WithHost accepted")
	}
	var a Addr
	if err := a.UnmarshalText([]byte("fe80::1")); err == nil {
		t.Error("UnmarshalText accepted fe80::1")
	}
	if (Addr{}).String() != "invalid 6PN" {
		t.Error("zero Addr String")
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"fdaa:dead:beef:0:b:1234:5678:0", "fdaa::", "10.0.0.1", "fdaa:0:1:0:2:0:3:0/128", "::ffff:1.2.3.4", "fdaa:0:1:0:2:0:3:1%x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrBadAddr) {
				t.Fatalf("Parse(%q): error %v does not wrap ErrBadAddr", s, err)
			}
			return
		}
		// Anything accepted is a well-formed 6PN address and round-trips.
		if a.Org() == 0 || a.Host() == 0 || a.Machine() == 0 || !Prefix6PN.Contains(a.IP()) {
			t.Fatalf("Parse(%q) accepted %v", s, a)
		}
		b, err := Build(a.Org(), a.Host(), a.Machine())
		if err != nil || b != a {
			t.Fatalf("Build of parsed %q: %v %v", s, b, err)
		}
		c, err := Parse(a.String())
		if err != nil || c != a {
			t.Fatalf("re-Parse of %q: %v %v", a, c, err)
		}
		if ip, _ := netip.ParseAddr(s); ip != a.IP() {
			t.Fatalf("Parse(%q) = %v, netip says %v", s, a, ip)
		}
	})
}

func TestParseFabricMember(t *testing.T) {
	m, err := ParseFabricMember("w-a,0x0a,fd00:fe::a")
	if err != nil || m.NS != "w-a" || m.HostID != 10 || m.Addr != netip.MustParseAddr("fd00:fe::a") {
		t.Fatalf("ParseFabricMember = %+v, %v", m, err)
	}
	if m, err := ParseFabricMember("peer,0,fd00:fe::99"); err != nil || m.HostID != 0 {
		t.Fatalf("peer: %+v, %v", m, err)
	}
	for _, bad := range []string{"", "a,1", "a,1,fd00::1,x", ",1,fd00::1", "../x,1,fd00::1", "a,-1,fd00::1",
		"a,4294967296,fd00::1", "a,1,10.0.0.1", "a,1,::ffff:10.0.0.1", "a,1,nope"} {
		if _, err := ParseFabricMember(bad); err == nil {
			t.Errorf("ParseFabricMember(%q) accepted", bad)
		}
	}
}
