package bench

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server"
	"github.com/ferry-dev/ferry/server/servertest"
)

func heartbeatCmd() []byte {
	p, _ := fsm.Encode(fsm.CmdHeartbeat, &fsm.HeartbeatCmd{Header: fsm.Header{Actor: fsm.Identity{Name: "w-bench", Kind: fsm.KindWorker}, Now: time.Now().UTC()},
		Name: "w-bench", LeaseTTL: time.Hour})
	return p
}

// takeovers stops the leader of a fresh 3-server cluster n times and
// returns, for each, the time until another server leads and has
// committed a command; each old leader restarts and rejoins in between.
func takeovers(b *testing.B, ht, lease time.Duration, n int) []time.Duration {
	c := servertest.New(b, 3, servertest.Options{HeartbeatTimeout: ht, LeaderLease: lease, WriteRate: -1})
	defer c.Close()
	if _, err := c.Client("w-bench", tlsutil.KindWorker).RegisterWorker(context.Background(), fsm.Worker{Name: "w-bench"}, time.Hour); err != nil {
		b.Fatal(err)
	}
	var took []time.Duration
	for i := 0; i < n; i++ {
		old := c.WaitLeader(20 * time.Second)
		c.WaitConverged(20 * time.Second)
		start := time.Now()
		c.Stop(old)
		for {
			if time.Since(start) > time.Minute {
				b.Fatalf("no server took over within a minute of stopping leader %d", old)
			}
			if l := c.Leader(); l >= 0 && l != old {
				if _, err := c.Servers[l].Node().Apply(heartbeatCmd(), time.Second); err == nil {
					break
				}
			}
			time.Sleep(5 * time.Millisecond)
		}
		took = append(took, time.Since(start))
		c.Restart(old)
		c.WaitMembers(3, 20*time.Second)
	}
	return took
}

// electionsUnderLoad counts elections in a 3-server cluster kept busy for
// d: 32 proposals in flight into the leader's raft node and one CPU-bound
// goroutine per core competing with raft's own.
func electionsUnderLoad(b *testing.B, ht time.Duration, d time.Duration) (elections int, commits int64) {
	c := servertest.New(b, 3, servertest.Options{HeartbeatTimeout: ht, WriteRate: -1})
	defer c.Close()
	if _, err := c.Client("w-bench", tlsutil.KindWorker).RegisterWorker(context.Background(), fsm.Worker{Name: "w-bench"}, time.Hour); err != nil {
		b.Fatal(err)
	}
	l := c.WaitLeader(20 * time.Second)
	c.WaitConverged(20 * time.Second)
	term := func(i int) int {
		t, _ := strconv.Atoi(c.Servers[i].Node().Raft.Stats()["term"])
		return t
	}
	before := term(l)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var n atomic.Int64
	for g := 0; g < 32; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if l := c.Leader(); l >= 0 {
					if _, err := c.Servers[l].Node().Apply(heartbeatCmd(), 5*time.Second); err == nil {
						n.Add(1)
					}
				}
			}
		}()
	}
	for g := 0; g < runtime.NumCPU(); g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			x := 0
			for {
				select {
				case <-stop:
					_ = x
					return
				default:
				}
				for k := 0; k < 1e6; k++ {
					x += k
				}
			}
		}()
	}
	time.Sleep(d)
	close(stop)
	wg.Wait()
	return term(c.WaitLeader(20*time.Second)) - before, n.Load()
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
