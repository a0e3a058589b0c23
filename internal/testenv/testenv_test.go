package testenv

import (
	"fmt"
	"testing"
)

func TestStrict(t *testing.T) {
	for _, c := range []struct {
		require, ci string
		want        bool
	}{
		{"", "", false},
		{"", "true", true},
		{"all", "", true},
		{"none", "true", false},
		{"typo", "", true},
	} {
		t.Setenv("FERRY_REQUIRE", c.require)
		t.Setenv("CI", c.ci)
		if got := Strict(); got != c.want {
			t.Errorf("FERRY_REQUIRE=%q CI=%q: strict %v, want %v", c.require, c.ci, got, c.want)
		}
	}
}

// recorder stands in for a test: it records whether Require skipped or
// failed, and stops like the real methods do (runtime.Goexit) by panicking.
type recorder struct {
	testing.TB
	action, msg string
}

type stop struct{}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(f string, a ...any) {
	r.action, r.msg = "fail", fmt.Sprintf(f, a...)
	panic(stop{})
}
func (r *recorder) Skipf(f string, a ...any) {
	r.action, r.msg = "skip", fmt.Sprintf(f, a...)
	panic(stop{})
}

func call(f func(testing.TB)) (r *recorder) {
	r = &recorder{}
	defer func() {
		if p := recover(); p != nil {
			if _, ok := p.(stop); !ok {
				panic(p)
			}
		}
	}()
	f(r)
	return r
}

func TestRequire(t *testing.T) {
	t.Setenv("FERRY_IN_VM", "")
	t.Setenv("FERRY_REQUIRE", "none")
	if r := call(func(tb testing.TB) { Require(tb, "tgtd", true) }); r.action != "" {
		t.Errorf("present: %s %q", r.action, r.msg)
	}
	if r := call(func(tb testing.TB) { Tools(tb, "apt-get install nothing", "ferry-no-such-tool") }); r.action != "skip" || r.msg != "needs ferry-no-such-tool: apt-get install nothing" {
		t.Errorf("missing, lenient: %s %q", r.action, r.msg)
	}
	t.Setenv("FERRY_REQUIRE", "all")
	if r := call(func(tb testing.TB) { Paths(tb, "modprobe nothing", "/ferry/no/such/path") }); r.action != "fail" || r.msg[:len("needs /ferry/no/such/path: modprobe nothing")] != "needs /ferry/no/such/path: modprobe nothing" {
		t.Errorf("missing, strict: %s %q", r.action, r.msg)
	}
	// Guest-only needs skip on the host even in strict mode...
	if r := call(func(tb testing.TB) { Guest(tb, "dm-clone", false) }); r.action != "skip" {
		t.Errorf("guest need on the host: %s %q", r.action, r.msg)
	}
	// ...and fail inside the VM.
	t.Setenv("FERRY_IN_VM", "1")
	if r := call(func(tb testing.TB) { Guest(tb, "dm-clone", false) }); r.action != "fail" {
		t.Errorf("guest need in the VM: %s %q", r.action, r.msg)
	}
}
