package servertest

import (
	"context"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
)

// benchWorker is the worker whose heartbeats the raft benchmarks commit.
const benchWorker = "w-bench"

// RegisterBenchWorker registers the worker HeartbeatCommand beats for.
func (c *Cluster) RegisterBenchWorker(tb testing.TB) {
	tb.Helper()
	if _, err := c.Client(benchWorker, tlsutil.KindWorker).RegisterWorker(context.Background(), fsm.Worker{Name: benchWorker}, time.Hour); err != nil {
		tb.Fatal(err)
	}
}

// HeartbeatCommand is an encoded heartbeat of the bench worker, to apply
// straight to a raft node.
func HeartbeatCommand() []byte {
	p, _ := fsm.Encode(fsm.CmdHeartbeat, &fsm.HeartbeatCmd{Header: fsm.Header{Actor: fsm.Identity{Name: benchWorker, Kind: fsm.KindWorker}, Now: time.Now().UTC()},
		Name: benchWorker, LeaseTTL: time.Hour})
	return p
}

// Takeover stops the leader and returns the time until another server
// leads and has committed a command; the old leader then restarts and the
// cluster has its members back before it returns.
func (c *Cluster) Takeover(tb testing.TB) time.Duration {
	tb.Helper()
	old := c.WaitLeader(20 * time.Second)
	c.WaitConverged(20 * time.Second)
	start := time.Now()
	c.Stop(old)
	for {
		if time.Since(start) > time.Minute {
			tb.Fatalf("no server took over within a minute of stopping leader %d", old)
		}
		if l := c.Leader(); l >= 0 && l != old {
			if _, err := c.Servers[l].Node().Apply(HeartbeatCommand(), time.Second); err == nil {
				break
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	took := time.Since(start)
	c.Restart(old)
	c.WaitMembers(3, 20*time.Second)
	return took
}

// ElectionsUnderLoad keeps the cluster busy for d (32 proposals in flight
// straight into the leader's raft node, one CPU-bound goroutine per core
// competing with raft's own) and returns how many elections it held (the
// term's growth; a healthy cluster keeps its leader: 0) and the commits.
func (c *Cluster) ElectionsUnderLoad(tb testing.TB, d time.Duration) (elections int, commits int64) {
	tb.Helper()
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
	for range 32 {
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
					if _, err := c.Servers[l].Node().Apply(HeartbeatCommand(), 5*time.Second); err == nil {
						n.Add(1)
					}
				}
			}
		}()
	}
	for range runtime.NumCPU() {
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
