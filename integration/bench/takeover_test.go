package bench

import (
	"fmt"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/server"
	"github.com/ferry-dev/ferry/server/servertest"
)

// takeovers stops the leader of a fresh 3-server cluster n times and
// returns, for each, the time until another server leads and has
// committed a command; each old leader restarts and rejoins in between.
func takeovers(b *testing.B, ht, lease time.Duration, n int) []time.Duration {
	c := servertest.New(b, 3, servertest.Options{HeartbeatTimeout: ht, LeaderLease: lease, WriteRate: -1})
	defer c.Close()
	c.RegisterBenchWorker(b)
	var took []time.Duration
	for range n {
		took = append(took, c.Takeover(b))
	}
	return took
}

// electionsUnderLoad counts elections in a 3-server cluster kept busy for
// d (servertest.Cluster.ElectionsUnderLoad).
func electionsUnderLoad(b *testing.B, ht time.Duration, d time.Duration) (elections int, commits int64) {
	c := servertest.New(b, 3, servertest.Options{HeartbeatTimeout: ht, WriteRate: -1})
	defer c.Close()
	c.RegisterBenchWorker(b)
	return c.ElectionsUnderLoad(b, d)
}

// benchTakeover: leader takeover with the server's raft timing, beside
// raft's own defaults (1 s) in the same run, and the elections a loaded
// cluster holds with the server's timing (the goal: none).
func benchTakeover(b *testing.B, s *suite) {
	n, load := 7, 15*time.Second
	if quick {
		n, load = 3, 5*time.Second
	}
	ours := takeovers(b, server.DefaultHeartbeatTimeout, 0, n)
	ref := takeovers(b, time.Second, 500*time.Millisecond, n)
	elections, commits := electionsUnderLoad(b, server.DefaultHeartbeatTimeout, load)
	mo, mr := median(ours), median(ref)
	s.add(row{"raft leader takeover, 3 servers (median)", mo.Round(time.Millisecond).String(),
		fmt.Sprintf("raft's defaults (1 s timeouts): %v", mr.Round(time.Millisecond)), fmt.Sprintf("%.2f", mo.Seconds()/mr.Seconds()),
		fmt.Sprintf("server's timing (heartbeat timeout %v): runs %v, max %v; under load: %d elections in %v (%d commits/s, 32 in flight, every core busy)",
			server.DefaultHeartbeatTimeout, roundAll(ours), maxD(ours).Round(time.Millisecond), elections, load, commits/int64(load.Seconds()))})
	s.notes = append(s.notes, "Leader takeover: three `ferry server`s in-process (raft over mTLS on loopback); the leader is stopped and the time runs until another server leads and has committed a command; the old leader restarts and rejoins before the next run. The reference is the same with raft's own default timeouts (1 s heartbeat and election timeout). Elections under load: the term's growth while 32 proposals stay in flight and one busy goroutine per core competes with raft (a healthy cluster keeps its leader: 0).")
}

func maxD(ds []time.Duration) time.Duration {
	var m time.Duration
	for _, d := range ds {
		m = max(m, d)
	}
	return m
}
