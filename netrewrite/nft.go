package netrewrite

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"sync"
)

// NATTable is the nftables table (family ip6) that holds ModeNAT mappings in
// a target worker's namespace. It exists only while a mapping does, so a
// worker without mappings has exactly the ruleset it had before.
const NATTable = "ferry_6pn"

const natCommentPrefix = "ferry-6pn "

// natMu serialises list-then-change on the NAT table: without it, removing
// the last rule of one mapping could delete the table just as another
// cutover in this process added its rule.
var natMu sync.Mutex

// natRule is one DNAT mapping as found in the kernel.
type natRule struct {
	handle   int
	old, new string
}

func lookNFT() (string, error) {
	p, err := exec.LookPath("nft")
	if err != nil {
		return "", fmt.Errorf("nft not found: install nftables (needed for mapping mode %q): %w", ModeNAT, err)
	}
	return p, nil
}

func nft(ctx context.Context, ns, stdin string, args ...string) ([]byte, error) {
	if _, err := lookNFT(); err != nil {
		return nil, err
	}
	cmd := CommandInNS(ctx, ns, "nft", args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		return out, privErr(fmt.Errorf("nft %s in namespace %q: %w: %s", strings.Join(args, " "), ns, err, msg))
	}
	return out, nil
}

// listNAT returns ferry's DNAT rules in ns; no table means none.
func listNAT(ctx context.Context, ns string) ([]natRule, bool, error) {
	out, err := nft(ctx, ns, "", "-j", "list", "table", "ip6", NATTable)
	if err != nil {
		if strings.Contains(err.Error(), "No such file or directory") {
			return nil, false, nil
		}
		return nil, false, err
	}
	var doc struct {
		Nftables []struct {
			Rule *struct {
				Handle  int    `json:"handle"`
				Comment string `json:"comment"`
			} `json:"rule"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return nil, true, fmt.Errorf("reading nft table %s: %w", NATTable, err)
	}
	var rules []natRule
	for _, e := range doc.Nftables {
		if e.Rule == nil || !strings.HasPrefix(e.Rule.Comment, natCommentPrefix) {
			continue
		}
		old, new, ok := strings.Cut(strings.TrimPrefix(e.Rule.Comment, natCommentPrefix), ">")
		if !ok {
			continue
		}
		rules = append(rules, natRule{handle: e.Rule.Handle, old: old, new: new})
	}
	return rules, true, nil
}

// ensureNAT installs `ip6 daddr OLD dnat to NEW` in the prerouting nat chain
// of ns. A rule for OLD with another target is replaced in the same batch.
func ensureNAT(ctx context.Context, ns string, old, new Addr) error {
	natMu.Lock()
	defer natMu.Unlock()
	rules, _, err := listNAT(ctx, ns)
	if err != nil {
		return err
	}
	var script strings.Builder
	fmt.Fprintf(&script, "add table ip6 %s\n", NATTable)
	fmt.Fprintf(&script, "add chain ip6 %s prerouting { type nat hook prerouting priority dstnat; policy accept; }\n", NATTable)
	for _, r := range rules {
		if r.old != old.String() {
			continue
		}
		if r.new == new.String() {
			return nil
		}
		fmt.Fprintf(&script, "delete rule ip6 %s prerouting handle %d\n", NATTable, r.handle)
	}
	fmt.Fprintf(&script, "add rule ip6 %s prerouting ip6 daddr %s dnat to %s comment %q\n",
		NATTable, old, new, natCommentPrefix+old.String()+">"+new.String())
	_, err = nft(ctx, ns, script.String(), "-f", "-")
	return err
}

// removeNAT deletes the DNAT rule of old in ns, and the table once empty.
// Without nft installed there is nothing to remove unless required.
func removeNAT(ctx context.Context, ns string, old Addr, required bool) error {
	if _, err := lookNFT(); err != nil && !required {
		return nil
	}
	natMu.Lock()
	defer natMu.Unlock()
	rules, exists, err := listNAT(ctx, ns)
	if err != nil || !exists {
		return err
	}
	var script strings.Builder
	left := 0
	for _, r := range rules {
		if r.old == old.String() {
			fmt.Fprintf(&script, "delete rule ip6 %s prerouting handle %d\n", NATTable, r.handle)
		} else {
			left++
		}
	}
	if left == 0 {
		script.Reset()
		fmt.Fprintf(&script, "delete table ip6 %s\n", NATTable)
	}
	if script.Len() == 0 {
		return nil
	}
	_, err = nft(ctx, ns, script.String(), "-f", "-")
	return err
}
