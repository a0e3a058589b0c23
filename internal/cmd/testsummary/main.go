// Command testsummary reads `go test -json` on stdin, prints each package's
// result as it finishes, the output of every failed test, and at the end a
// per-package table of passed, failed and skipped tests. It exits non-zero
// when a test or package failed, a build failed, nothing ran, or a test
// skipped that the allow-list does not name: a skipped test proves nothing,
// so a run that skipped one it should not have is not a green run.
//
//	go test -json ./... | go run ./internal/cmd/testsummary -allow scripts/skip-allow.txt
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"sort"
	"strings"
	"time"
)

const module = "github.com/ferry-dev/ferry"

// event is one line of `go test -json` (cmd/test2json's TestEvent, plus the
// build events of `go test -json`).
type event struct {
	Time        time.Time
	Action      string
	Package     string
	Test        string
	Elapsed     float64
	Output      string
	ImportPath  string
	FailedBuild string
}

// allowed is one line of the allow-list: a test (or glob over top-level test
// names) in a package that may skip, and why.
type allowed struct {
	pkg, test, reason string
}

func parseAllow(r io.Reader) ([]allowed, error) {
	var out []allowed
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 3 {
			return nil, fmt.Errorf("line %d: want \"<package> <test or glob> <reason>\", got %q", n, line)
		}
		if _, err := path.Match(f[1], ""); err != nil {
			return nil, fmt.Errorf("line %d: bad glob %q: %w", n, f[1], err)
		}
		out = append(out, allowed{pkg: f[0], test: f[1], reason: strings.Join(f[2:], " ")})
	}
	return out, sc.Err()
}

// isAllowed matches a skipped test against the list; a subtest is allowed
// when its top-level test is.
func isAllowed(list []allowed, pkg, test string) bool {
	pkg = strings.TrimPrefix(strings.TrimPrefix(pkg, module), "/")
	top, _, _ := strings.Cut(test, "/")
	for _, a := range list {
		if a.pkg != pkg {
			continue
		}
		if ok, _ := path.Match(a.test, top); ok {
			return true
		}
	}
	return false
}

type pkgResult struct {
	pass, fail, skip int
	result           string // pass, fail, skip (no test files), or "" while running
	elapsed          float64
	output           []string // package-level output (TestMain, panics, timeouts)
}

type summary struct {
	w        io.Writer
	allow    []allowed
	pkgs     map[string]*pkgResult
	outputs  map[string][]string // "pkg\x00test" -> output lines
	skipped  []string            // "pkg test: reason"
	badSkips []string
	failed   []string
	builds   []string
	events   int
}

func newSummary(w io.Writer, allow []allowed) *summary {
	return &summary{w: w, allow: allow, pkgs: map[string]*pkgResult{}, outputs: map[string][]string{}}
}

func (s *summary) pkg(name string) *pkgResult {
	p := s.pkgs[name]
	if p == nil {
		p = &pkgResult{}
		s.pkgs[name] = p
	}
	return p
}

func short(pkg string) string {
	if r := strings.TrimPrefix(strings.TrimPrefix(pkg, module), "/"); r != "" {
		return r
	}
	return "."
}

// add handles one line of input; a line that is not an event (go test
// writes some errors as plain text) is passed through.
func (s *summary) add(line []byte) {
	var e event
	if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
		fmt.Fprintf(s.w, "%s\n", line)
		return
	}
	s.events++
	switch e.Action {
	case "build-output":
		fmt.Fprint(s.w, e.Output)
		return
	case "build-fail":
		s.builds = append(s.builds, e.ImportPath)
		return
	}
	if e.Package == "" {
		return
	}
	p := s.pkg(e.Package)
	key := e.Package + "\x00" + e.Test
	switch e.Action {
	case "output":
		if e.Test == "" {
			p.output = append(p.output, e.Output)
		} else {
			s.outputs[key] = append(s.outputs[key], e.Output)
		}
	case "pass", "fail", "skip":
		if e.Test == "" {
			p.result, p.elapsed = e.Action, e.Elapsed
			s.packageDone(e.Package, p)
			return
		}
		switch e.Action {
		case "pass":
			p.pass++
		case "fail":
			p.fail++
			s.failed = append(s.failed, short(e.Package)+" "+e.Test)
			fmt.Fprintf(s.w, "--- FAIL %s %s (%.1fs)\n%s", short(e.Package), e.Test, e.Elapsed, strings.Join(s.outputs[key], ""))
		case "skip":
			p.skip++
			entry := fmt.Sprintf("%s %s: %s", short(e.Package), e.Test, skipReason(s.outputs[key]))
			s.skipped = append(s.skipped, entry)
			if !isAllowed(s.allow, e.Package, e.Test) {
				s.badSkips = append(s.badSkips, entry)
			}
		}
		delete(s.outputs, key)
	}
}

// skipReason is the message the test skipped with: its output lines other
// than the framework's "=== RUN" and "--- SKIP", joined on one line and
// cut at 300 bytes.
func skipReason(lines []string) string {
	var parts []string
	for _, l := range lines {
		l = strings.Join(strings.Fields(l), " ")
		if l == "" || strings.HasPrefix(l, "--- SKIP") || strings.HasPrefix(l, "=== ") {
			continue
		}
		parts = append(parts, l)
	}
	r := strings.Join(parts, " ")
	if r == "" {
		return "(no reason given)"
	}
	if len(r) > 300 {
		r = r[:300] + "…"
	}
	return r
}

// failureSigns start the lines that say why a package failed outside its
// tests: the race detector (in the test process or, through
// testbed.RaceReports, in the processes it started), a panic, a timeout.
var failureSigns = []string{"WARNING: DATA RACE", "the race detector reported", "race detected",
	"panic:", "fatal error:", "test timed out"}

// failureExcerpt is the part of a package's own output that says why it
// failed: up to 40 lines from the first sign of failureSigns, or its last
// 20 lines when none is there; at most 4000 bytes.
func failureExcerpt(output []string) string {
	text := strings.Join(output, "")
	lines := strings.Split(strings.TrimRight(text, "\n"), "\n")
	from, n := max(len(lines)-20, 0), 20
	for i, l := range lines {
		if slices.ContainsFunc(failureSigns, func(sign string) bool { return strings.Contains(l, sign) }) {
			from, n = i, 40
			break
		}
	}
	ex := strings.Join(lines[from:min(from+n, len(lines))], "\n")
	if len(ex) > 4000 {
		ex = ex[:4000] + "…"
	}
	return "  | " + strings.ReplaceAll(ex, "\n", "\n  | ")
}

func (s *summary) packageDone(name string, p *pkgResult) {
	if p.result == "skip" {
		return // no test files
	}
	status := "ok  "
	if p.result == "fail" {
		status = "FAIL"
		if p.fail == 0 {
			// The package failed outside any test (TestMain, a panic, a
			// timeout): its own output is the only account of why.
			fmt.Fprint(s.w, strings.Join(p.output, ""))
		}
	}
	fmt.Fprintf(s.w, "%s %-28s %7.1fs  pass %d  fail %d  skip %d\n", status, short(name), p.elapsed, p.pass, p.fail, p.skip)
}

// finish prints the table and returns why the run is not green, or nil.
func (s *summary) finish() error {
	names := make([]string, 0, len(s.pkgs))
	for n, p := range s.pkgs {
		if p.result != "skip" {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var tp, tf, ts int
	var failedPkgs, unfinished, outside []string
	fmt.Fprintf(s.w, "\n%-28s %6s %6s %7s  %s\n", "package", "passed", "failed", "skipped", "result")
	for _, n := range names {
		p := s.pkgs[n]
		res := p.result
		switch res {
		case "":
			res = "did not finish"
			unfinished = append(unfinished, short(n))
		case "fail":
			failedPkgs = append(failedPkgs, short(n))
			if p.fail == 0 {
				outside = append(outside, fmt.Sprintf("%s failed outside its tests:\n%s", short(n), failureExcerpt(p.output)))
			}
		}
		fmt.Fprintf(s.w, "%-28s %6d %6d %7d  %s\n", short(n), p.pass, p.fail, p.skip, res)
		tp, tf, ts = tp+p.pass, tf+p.fail, ts+p.skip
	}
	fmt.Fprintf(s.w, "%-28s %6d %6d %7d\n", "total", tp, tf, ts)
	if len(s.skipped) > 0 {
		fmt.Fprintln(s.w, "\nskipped:")
		for _, sk := range s.skipped {
			fmt.Fprintln(s.w, "  "+sk)
		}
	}
	var errs []error
	if s.events == 0 {
		errs = append(errs, errors.New("no test events on stdin: did go test run with -json?"))
	}
	if len(s.builds) > 0 {
		errs = append(errs, fmt.Errorf("build failed: %s", strings.Join(s.builds, ", ")))
	}
	if len(s.failed) > 0 {
		errs = append(errs, fmt.Errorf("%d tests failed: %s", len(s.failed), strings.Join(s.failed, ", ")))
	}
	if len(failedPkgs) > 0 {
		errs = append(errs, fmt.Errorf("packages failed: %s", strings.Join(failedPkgs, ", ")))
	}
	// Repeated at the very end, where a reader of only the log's tail
	// sees it: the package printed it long before (a race report comes
	// before a suite's own tables).
	for _, o := range outside {
		errs = append(errs, errors.New(o))
	}
	if len(unfinished) > 0 {
		errs = append(errs, fmt.Errorf("packages without a result (go test killed?): %s", strings.Join(unfinished, ", ")))
	}
	if len(s.badSkips) > 0 {
		errs = append(errs, fmt.Errorf("%d tests skipped that scripts/skip-allow.txt does not allow (install what they need, see scripts/deps.sh, or run as root):\n  %s",
			len(s.badSkips), strings.Join(s.badSkips, "\n  ")))
	}
	return errors.Join(errs...)
}

func main() {
	allowPath := flag.String("allow", "scripts/skip-allow.txt", "allow-list of tests that may skip")
	raw := flag.String("o", "", "also write the raw go test -json stream to this file")
	flag.Parse()
	f, err := os.Open(*allowPath)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testsummary: open the skip allow-list: %v\n", err)
		os.Exit(2)
	}
	allow, err := parseAllow(f)
	f.Close()
	if err != nil {
		fmt.Fprintf(os.Stderr, "testsummary: %s: %v\n", *allowPath, err)
		os.Exit(2)
	}
	in := io.Reader(os.Stdin)
	if *raw != "" {
		rf, err := os.Create(*raw)
		if err != nil {
			fmt.Fprintf(os.Stderr, "testsummary: %v\n", err)
			os.Exit(2)
		}
		defer rf.Close()
		in = io.TeeReader(in, rf)
	}
	s := newSummary(os.Stdout, allow)
	r := bufio.NewReaderSize(in, 1<<20)
	for {
		line, err := r.ReadBytes('\n')
		if len(line) > 0 {
			s.add([]byte(strings.TrimRight(string(line), "\r\n")))
		}
		if err != nil {
			if err != io.EOF {
				fmt.Fprintf(os.Stderr, "testsummary: read: %v\n", err)
				os.Exit(2)
			}
			break
		}
	}
	if err := s.finish(); err != nil {
		fmt.Fprintf(os.Stdout, "\nFAIL: %v\n", err)
		os.Exit(1)
	}
	fmt.Fprintln(os.Stdout, "\nPASS: every test passed or skipped as the allow-list permits")
}
