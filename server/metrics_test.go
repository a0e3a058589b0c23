package server_test

import (
	"regexp"
	"strconv"
	"testing"

	"github.com/ferry-dev/ferry/server/servertest"
)

// TestRaftApplyLatencyMetric: the leader times each command it commits, so
// the writes setupFleet makes show up in ferry_raft_apply_seconds, with a
// plausible total.
func TestRaftApplyLatencyMetric(t *testing.T) {
	c := servertest.New(t, 1, servertest.Options{})
	setupFleet(t, c)
	r := rawGet(t, c, "operator", "/metrics")
	if r.StatusCode != 200 {
		t.Fatalf("metrics: %d\n%s", r.StatusCode, r.body)
	}
	count := regexp.MustCompile(`(?m)^ferry_raft_apply_seconds_count (\d+)$`).FindStringSubmatch(r.body)
	sum := regexp.MustCompile(`(?m)^ferry_raft_apply_seconds_sum (\S+)$`).FindStringSubmatch(r.body)
	if count == nil || sum == nil {
		t.Fatalf("no ferry_raft_apply_seconds histogram:\n%s", r.body)
	}
	n, _ := strconv.Atoi(count[1])
	total, _ := strconv.ParseFloat(sum[1], 64)
	// setupFleet registers two workers, two volumes, two machines and a
	// migration, and proposes events: each is one committed command.
	if n < 5 {
		t.Fatalf("ferry_raft_apply_seconds_count %d after setupFleet's writes, want at least 5", n)
	}
	if total <= 0 || total/float64(n) > 10 {
		t.Fatalf("ferry_raft_apply_seconds_sum %v over %d commands", total, n)
	}
	if !regexp.MustCompile(`ferry_raft_apply_seconds_bucket\{le="0.001"\} \d+`).MatchString(r.body) {
		t.Fatalf("no 1 ms bucket:\n%s", r.body)
	}
	// Proposals that never committed are counted apart: none here.
	if !regexp.MustCompile(`(?m)^ferry_raft_apply_failures_total 0$`).MatchString(r.body) {
		t.Fatalf("no ferry_raft_apply_failures_total at 0 on a healthy leader:\n%s", r.body)
	}
}
