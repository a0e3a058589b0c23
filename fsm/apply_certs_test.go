package fsm

import (
	"bytes"
	"io"
	"math/big"
	"testing"

	"github.com/rs/zerolog"
)

func TestRevokeCert(t *testing.T) {
	h := newHarness(t)
	for _, id := range []Identity{srcW, server} {
		r := h.apply(CmdRevokeCert, &RevokeCertCmd{Header: h.hdr(id), Serial: "abc"})
		if r.Refusal == nil || r.Refusal.Kind != RefuseForbidden {
			t.Fatalf("%s revoked a certificate: %+v", id, r.Refusal)
		}
	}
	for _, bad := range []string{"", "xyz", "0", "AB", "ab:cd", "-1", string(bytes.Repeat([]byte("f"), 41))} {
		if r := h.apply(CmdRevokeCert, &RevokeCertCmd{Header: h.hdr(operator), Serial: bad}); r.Refusal == nil || r.Refusal.Kind != RefuseInvalid {
			t.Errorf("serial %q accepted: %+v", bad, r.Refusal)
		}
	}
	if r := h.apply(CmdRevokeCert, &RevokeCertCmd{Header: h.hdr(operator), Serial: "abc", Reason: string(bytes.Repeat([]byte("x"), 300))}); r.Refusal == nil {
		t.Error("a 300-byte reason was stored")
	}
	h.must(h.apply(CmdRevokeCert, &RevokeCertCmd{Header: h.hdr(operator), Serial: "abc", Reason: "lost laptop"}))
	if r := h.must(h.apply(CmdRevokeCert, &RevokeCertCmd{Header: h.hdr(operator), Serial: "abc", Reason: "again"})); !r.Duplicate {
		t.Error("second revocation of the same serial not reported as duplicate")
	}
	if !h.s.Revoked("abc") || h.s.Revoked("abd") {
		t.Fatal("deny list lookup wrong")
	}
	if l := h.s.RevokedCerts(); len(l) != 1 || l[0].Reason != "lost laptop" || l[0].By != operator {
		t.Fatalf("deny list %+v", l)
	}

	// The deny list survives a snapshot.
	snap := snapshotBytes(t, h.s)
	s2 := NewStore(zerolog.Nop())
	if err := s2.Restore(io.NopCloser(bytes.NewReader(snap))); err != nil {
		t.Fatal(err)
	}
	if !s2.Revoked("abc") {
		t.Fatal("revocation lost in the snapshot")
	}
}

func TestNormalizeSerial(t *testing.T) {
	for in, want := range map[string]string{
		"ABC":       "abc",
		"0x00ab:CD": "abcd",
		" 5e:ed ":   "5eed",
		"0001":      "1",
		"ff" + "ff": "ffff",
	} {
		got, err := NormalizeSerial(in)
		if err != nil || got != want {
			t.Errorf("NormalizeSerial(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "0", "g1", "0x", "-5", string(bytes.Repeat([]byte("1"), 41))} {
		if got, err := NormalizeSerial(bad); err == nil {
			t.Errorf("NormalizeSerial(%q) = %q", bad, got)
		}
	}
	if k := SerialKey(big.NewInt(0xabcd)); k != "abcd" {
		t.Fatalf("SerialKey = %q", k)
	}
}

// FuzzNormalizeSerial: what an operator types is either refused or becomes
// a canonical key that normalizes to itself.
func FuzzNormalizeSerial(f *testing.F) {
	for _, s := range []string{"5eed0f1e2d3c4b5a", "0x00AB:cd", "", "-1", "0", "zz"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := NormalizeSerial(s)
		if err != nil {
			return
		}
		again, err := NormalizeSerial(n)
		if err != nil || again != n || len(n) > 40 {
			t.Fatalf("%q -> %q -> %q, %v", s, n, again, err)
		}
	})
}
