package netrewrite

import (
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"sort"
	"strings"
)

var linkHeader = regexp.MustCompile(`^\d+: ([^:@\s]+)(@\S+)?:(.*)$`)

// normalizeAddrs rewrites `ip addr` output without link indexes, sorted by
// interface name.
func normalizeAddrs(out string) string {
	var blocks []string
	for _, line := range strings.SplitAfter(out, "\n") {
		if line == "" {
			continue
		}
		if m := linkHeader.FindStringSubmatch(strings.TrimRight(line, "\n")); m != nil {
			blocks = append(blocks, m[1]+":"+m[3]+"\n")
			continue
		}
		if len(blocks) == 0 {
			blocks = append(blocks, "")
		}
		blocks[len(blocks)-1] += line
	}
	sort.Strings(blocks)
	return strings.Join(blocks, "")
}

// KernelState is a text snapshot of a namespace's IPv6 state as an operator
// would look at it: `ip -6 addr`, `ip -6 route show table all` and, when nft
// is installed, `nft list ruleset`, plus the permanent neighbor entries
// (ferry pins the neighbors of the paths it builds). Tests compare snapshots to prove that
// rollback and re-application converge. Interface indexes (and the
// "@peer" of a veth, which ip prints by index) are dropped and interfaces
// sorted by name: a veth re-created after a crash gets a new index but is
// the same state.
func KernelState(ctx context.Context, ns string) (string, error) {
	var b strings.Builder
	cmds := [][]string{
		{"ip", "-6", "addr", "show"},
		{"ip", "-6", "route", "show", "table", "all"},
		{"ip", "-6", "neigh", "show", "nud", "permanent"},
	}
	if _, err := exec.LookPath("nft"); err == nil {
		cmds = append(cmds, []string{"nft", "list", "ruleset"})
	}
	for _, c := range cmds {
		out, err := CommandInNS(ctx, ns, c[0], c[1:]...).CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("%s in namespace %q: %w: %s", strings.Join(c, " "), ns, err, out)
		}
		text := string(out)
		switch c[2] {
		case "addr":
			text = normalizeAddrs(text)
		case "neigh": // listed in hash-table order
			lines := strings.SplitAfter(text, "\n")
			sort.Strings(lines)
			text = strings.Join(lines, "")
		}
		fmt.Fprintf(&b, "$ %s\n%s", strings.Join(c, " "), text)
	}
	return b.String(), nil
}
