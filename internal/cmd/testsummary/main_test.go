package main

import (
	"bytes"
	"strings"
	"testing"
)

const allowList = `
# comment
dmclone TestKernel* the VM run enforces them
`

func run(t *testing.T, stream string) (string, error) {
	t.Helper()
	allow, err := parseAllow(strings.NewReader(allowList))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	s := newSummary(&out, allow)
	for _, l := range strings.Split(strings.TrimSpace(stream), "\n") {
		s.add([]byte(strings.TrimSpace(l)))
	}
	err = s.finish()
	return out.String(), err
}

const (
	pkgA = "github.com/ferry-dev/ferry/dmclone"
	pkgB = "github.com/ferry-dev/ferry/loopdev"
)

func TestAllowedSkipPasses(t *testing.T) {
	out, err := run(t, `
{"Action":"run","Package":"`+pkgA+`","Test":"TestKernelClone"}
{"Action":"output","Package":"`+pkgA+`","Test":"TestKernelClone","Output":"=== RUN   TestKernelClone\n"}
{"Action":"output","Package":"`+pkgA+`","Test":"TestKernelClone","Output":"    kernel_test.go:9: needs dm-clone (dmsetup targets: linear\n"}
{"Action":"output","Package":"`+pkgA+`","Test":"TestKernelClone","Output":"        striped )\n"}
{"Action":"skip","Package":"`+pkgA+`","Test":"TestKernelClone/sub"}
{"Action":"skip","Package":"`+pkgA+`","Test":"TestKernelClone"}
{"Action":"pass","Package":"`+pkgA+`","Test":"TestParse"}
{"Action":"pass","Package":"`+pkgA+`","Elapsed":1.5}
{"Action":"skip","Package":"github.com/ferry-dev/ferry/internal/logging"}
`)
	if err != nil {
		t.Fatalf("an allowed skip failed the run: %v\n%s", err, out)
	}
	if !strings.Contains(out, "dmclone TestKernelClone: kernel_test.go:9: needs dm-clone (dmsetup targets: linear striped )\n") {
		t.Errorf("the skip reason is not listed:\n%s", out)
	}
	if !strings.Contains(out, "total                             1      0       2") {
		t.Errorf("wrong totals:\n%s", out)
	}
	if strings.Contains(out, "internal/logging") {
		t.Errorf("a package without test files is in the table:\n%s", out)
	}
}

func TestSkipNotAllowedFails(t *testing.T) {
	out, err := run(t, `
{"Action":"output","Package":"`+pkgB+`","Test":"TestAttach","Output":"    needs root (loop devices)\n"}
{"Action":"output","Package":"`+pkgB+`","Test":"TestAttach","Output":"--- SKIP: TestAttach (0.00s)\n"}
{"Action":"skip","Package":"`+pkgB+`","Test":"TestAttach"}
{"Action":"skip","Package":"`+pkgA+`","Test":"TestOther"}
{"Action":"pass","Package":"`+pkgB+`"}
{"Action":"pass","Package":"`+pkgA+`"}
`)
	if err == nil {
		t.Fatalf("a skip not on the list passed:\n%s", out)
	}
	for _, want := range []string{"2 tests skipped", "loopdev TestAttach: needs root (loop devices)", "dmclone TestOther"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
}

func TestFailuresFail(t *testing.T) {
	cases := map[string]string{
		"test": `{"Action":"output","Package":"` + pkgB + `","Test":"TestX","Output":"boom\n"}
			{"Action":"fail","Package":"` + pkgB + `","Test":"TestX"}
			{"Action":"fail","Package":"` + pkgB + `"}`,
		"package only": `{"Action":"output","Package":"` + pkgB + `","Output":"panic: test timed out\n"}
			{"Action":"fail","Package":"` + pkgB + `"}`,
		"build": `{"Action":"build-output","ImportPath":"x [x.test]","Output":"x.go:1: syntax error\n"}
			{"Action":"build-fail","ImportPath":"x [x.test]"}`,
		"unfinished": `{"Action":"run","Package":"` + pkgB + `","Test":"TestX"}`,
		"nothing":    `not json`,
	}
	for name, stream := range cases {
		t.Run(name, func(t *testing.T) {
			out, err := run(t, stream)
			if err == nil {
				t.Fatalf("passed:\n%s", out)
			}
		})
	}
	out, _ := run(t, cases["test"])
	if !strings.Contains(out, "--- FAIL loopdev TestX") || !strings.Contains(out, "boom") {
		t.Errorf("a failed test's output is not shown:\n%s", out)
	}
	out, _ = run(t, cases["package only"])
	if !strings.Contains(out, "panic: test timed out") {
		t.Errorf("a failed package's own output is not shown:\n%s", out)
	}
}

func TestParseAllowRejectsBadLines(t *testing.T) {
	for _, l := range []string{"dmclone TestX", "dmclone Test[ reason"} {
		if _, err := parseAllow(strings.NewReader(l)); err == nil {
			t.Errorf("%q accepted", l)
		}
	}
}

// A package that failed outside its tests (here: a race report of a child
// process, printed before the suite's own long tables) has the reason
// repeated in the final error, the part of a long log its reader sees.
func TestOutsideFailureRepeatedAtTheEnd(t *testing.T) {
	var stream strings.Builder
	line := func(out string) {
		stream.WriteString(`{"Action":"output","Package":"` + pkgB + `","Output":"` + out + `\n"}` + "\n")
	}
	line("the race detector reported 1 data races in ferry processes:")
	line("== ferry.123")
	line("WARNING: DATA RACE")
	line("Write at 0x00c000 by goroutine 7:")
	for i := range 60 {
		line("| table row " + strings.Repeat("x", i%7))
	}
	stream.WriteString(`{"Action":"pass","Package":"` + pkgB + `","Test":"TestX"}` + "\n")
	stream.WriteString(`{"Action":"fail","Package":"` + pkgB + `"}` + "\n")
	out, err := run(t, stream.String())
	if err == nil {
		t.Fatalf("passed:\n%s", out)
	}
	msg := err.Error()
	for _, want := range []string{"loopdev failed outside its tests", "the race detector reported 1", "Write at 0x00c000 by goroutine 7"} {
		if !strings.Contains(msg, want) {
			t.Errorf("the final error lacks %q:\n%s", want, msg)
		}
	}
	// Without a sign, the output's last lines.
	_, err = run(t, `{"Action":"output","Package":"`+pkgB+`","Output":"first\n"}
		{"Action":"output","Package":"`+pkgB+`","Output":"exit status 3\n"}
		{"Action":"fail","Package":"`+pkgB+`"}`)
	if err == nil || !strings.Contains(err.Error(), "  | exit status 3") {
		t.Errorf("the last lines are not repeated: %v", err)
	}
}
