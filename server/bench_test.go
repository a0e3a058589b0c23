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
	"github.com/ferry-dev/ferry/server"
	"github.com/ferry-dev/ferry/server/servertest"
)

// BenchmarkCommits3Node measures commands committed and applied per second
// by a 3-node cluster over loopback (mTLS raft transport), with 1 and 32
// proposals in flight, straight into the leader's raft node.
//
//	go test -run '^$' -bench Commits3Node -benchtime 3000x -count 5 ./server
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
//	go test -run '^$' -bench ProposeHTTP3Node -benchtime 2000x ./server
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

// BenchmarkLeaderTakeover kills the leader of a 3-node cluster and measures
// the time until another server leads and has committed a command, with
// raft's own timeouts (1 s heartbeat and election timeout) and with the
// server's defaults, side by side. Reports the median and the maximum.
//
//	go test -run '^$' -bench LeaderTakeover -benchtime 7x ./server
func BenchmarkLeaderTakeover(b *testing.B) {
	for _, t := range timings {
		b.Run(t.name, func(b *testing.B) { benchTakeover(b, t.ht, t.lease) })
	}
}

// timings compares raft's own defaults with the server's.
var timings = []struct {
	name      string
	ht, lease time.Duration
}{
	{"raft-defaults-1s", time.Second, 500 * time.Millisecond},
	{fmt.Sprintf("server-defaults-%v", server.DefaultHeartbeatTimeout), server.DefaultHeartbeatTimeout, 0},
}

func benchTakeover(b *testing.B, ht, lease time.Duration) {
	c := servertest.New(b, 3, servertest.Options{HeartbeatTimeout: ht, LeaderLease: lease, WriteRate: -1}) // throughput, not the per-identity limit
	c.RegisterBenchWorker(b)
	var took []time.Duration
	for range b.N {
		took = append(took, c.Takeover(b))
	}
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	b.ReportMetric(took[len(took)/2].Seconds()*1000, "ms-median-takeover")
	b.ReportMetric(took[len(took)-1].Seconds()*1000, "ms-max-takeover")
	b.Logf("takeover times (timeout %v): %v", ht, took)
}

// BenchmarkElectionsUnderLoad counts leader elections in a 3-node cluster
// kept busy for 15 s per b.N: 32 proposals in flight straight into the
// leader's raft node, and as many CPU-bound goroutines as cores competing
// with raft's own. A healthy cluster keeps its leader: the metric must stay 0.
//
//	go test -run '^$' -bench ElectionsUnderLoad -benchtime 1x ./server
func BenchmarkElectionsUnderLoad(b *testing.B) {
	for _, t := range timings {
		b.Run(t.name, func(b *testing.B) {
			c := servertest.New(b, 3, servertest.Options{HeartbeatTimeout: t.ht, LeaderLease: t.lease, WriteRate: -1})
			c.RegisterBenchWorker(b)
			d := time.Duration(b.N) * 15 * time.Second
			elections, commits := c.ElectionsUnderLoad(b, d)
			b.ReportMetric(float64(elections), "elections")
			b.ReportMetric(float64(commits)/d.Seconds(), "commits/s")
			b.Logf("timeout %v: %d elections, %d commits", t.ht, elections, commits)
		})
	}
}
