package server_test

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server/servertest"
)

// BenchmarkCommits3Node measures commands committed and applied per second
// by a 3-node cluster over loopback (mTLS raft transport), with 1 and 32
// proposals in flight, straight into the leader's raft node.
//
//	go test -run '^$' -bench Commits3Node -benchtime 3000x -count 5 ./api
func BenchmarkCommits3Node(b *testing.B) {
	c := servertest.New(b, 3, servertest.Options{HeartbeatTimeout: time.Second, WriteRate: -1}) // throughput, not the per-identity limit
	cl := c.Client("w-bench", tlsutil.KindWorker)
	if _, err := cl.RegisterWorker(context.Background(), fsm.Worker{Name: "w-bench"}, time.Hour); err != nil {
		b.Fatal(err)
	}
	for _, inflight := range []int{1, 32} {
		b.Run(fmt.Sprintf("inflight=%d", inflight), func(b *testing.B) {
			node := c.Servers[c.WaitLeader(10*time.Second)].Node()
			cmd, _ := fsm.Encode(fsm.CmdHeartbeat, &fsm.HeartbeatCmd{Header: fsm.Header{Actor: fsm.Identity{Name: "w-bench", Kind: fsm.KindWorker}, Now: time.Now().UTC()}, Name: "w-bench", LeaseTTL: time.Hour})
			var next atomic.Int64
			var wg sync.WaitGroup
			b.ResetTimer()
			start := time.Now()
			for g := 0; g < inflight; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for next.Add(1) <= int64(b.N) {
						if _, err := node.Apply(cmd, 10*time.Second); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "commits/s")
		})
	}
}

// BenchmarkProposeHTTP3Node measures full proposals per second through the
// API (mTLS HTTP, follower forwarding included when the client hits one),
// 16 clients in flight.
//
//	go test -run '^$' -bench ProposeHTTP3Node -benchtime 2000x ./api
func BenchmarkProposeHTTP3Node(b *testing.B) {
	c := servertest.New(b, 3, servertest.Options{HeartbeatTimeout: time.Second, WriteRate: -1}) // throughput, not the per-identity limit
	cl := c.Client("w-bench", tlsutil.KindWorker)
	ctx := context.Background()
	if _, err := cl.RegisterWorker(ctx, fsm.Worker{Name: "w-bench"}, time.Hour); err != nil {
		b.Fatal(err)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(b.N) {
				if _, err := cl.Heartbeat(ctx, "w-bench", time.Hour); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "proposals/s")
}

// BenchmarkLeaderTakeover kills the leader of a 3-node cluster with raft's
// default timeouts (1s heartbeat and election timeout) and measures the time
// until another server leads and has committed a command. Reports the median.
//
//	go test -run '^$' -bench LeaderTakeover -benchtime 5x ./api
func BenchmarkLeaderTakeover(b *testing.B) {
	c := servertest.New(b, 3, servertest.Options{HeartbeatTimeout: time.Second, WriteRate: -1}) // throughput, not the per-identity limit
	cmd := func() []byte {
		p, _ := fsm.Encode(fsm.CmdHeartbeat, &fsm.HeartbeatCmd{Header: fsm.Header{Actor: fsm.Identity{Name: "w-bench", Kind: fsm.KindWorker}, Now: time.Now().UTC()},
			Name: "w-bench", LeaseTTL: time.Hour})
		return p
	}
	if _, err := c.Client("w-bench", tlsutil.KindWorker).RegisterWorker(context.Background(), fsm.Worker{Name: "w-bench"}, time.Hour); err != nil {
		b.Fatal(err)
	}
	var took []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		old := c.WaitLeader(20 * time.Second)
		c.WaitConverged(20 * time.Second)
		start := time.Now()
		c.Stop(old)
		for {
			l := c.Leader()
			if l >= 0 && l != old {
				if _, err := c.Servers[l].Node().Apply(cmd(), time.Second); err == nil {
					break
				}
			}
			time.Sleep(5 * time.Millisecond)
		}
		took = append(took, time.Since(start))
		b.StopTimer()
		c.Restart(old)
		c.WaitMembers(3, 20*time.Second)
		b.StartTimer()
	}
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	b.ReportMetric(took[len(took)/2].Seconds()*1000, "ms-median-takeover")
	b.ReportMetric(took[len(took)-1].Seconds()*1000, "ms-max-takeover")
	b.Logf("takeover times: %v", took)
}
