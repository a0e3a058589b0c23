package server

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ferry-dev/ferry/fsm"
)

// collector exports migration counts by state and raft leadership.
type collector struct{ s *Server }

var (
	descMigrations = prometheus.NewDesc("ferry_migrations", "Migrations by state.", []string{"state"}, nil)
	descStalled    = prometheus.NewDesc("ferry_migrations_stalled", "Migrations flagged stalled.", nil, nil)
	descLeader     = prometheus.NewDesc("ferry_raft_leader", "1 when this server is the raft leader.", nil, nil)
	descIndex      = prometheus.NewDesc("ferry_raft_applied_index", "Last applied raft index.", nil, nil)
	descWorkers    = prometheus.NewDesc("ferry_workers_alive", "Workers with a valid lease.", nil, nil)
	descMachines   = prometheus.NewDesc("ferry_machines", "Machines by recorded state (failed: crashed too often, not restarted).", []string{"state"}, nil)
	descCrashes    = prometheus.NewDesc("ferry_machine_crashes", "Recent crashes of each machine that crashed, as its worker recorded them.", []string{"machine"}, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descMigrations
	ch <- descStalled
	ch <- descLeader
	ch <- descIndex
	ch <- descWorkers
	ch <- descMachines
	ch <- descCrashes
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	counts, stalled := c.s.store.StateCounts()
	for _, st := range fsm.AllStates {
		ch <- prometheus.MustNewConstMetric(descMigrations, prometheus.GaugeValue, float64(counts[st]), string(st))
	}
	ch <- prometheus.MustNewConstMetric(descStalled, prometheus.GaugeValue, float64(stalled))
	leader := 0.0
	if c.s.node.IsLeader() {
		leader = 1
	}
	ch <- prometheus.MustNewConstMetric(descLeader, prometheus.GaugeValue, leader)
	ch <- prometheus.MustNewConstMetric(descIndex, prometheus.GaugeValue, float64(c.s.store.Index()))
	alive, now := 0, c.s.cfg.Now()
	for _, w := range c.s.store.Workers() {
		if w.Alive(now) {
			alive++
		}
	}
	ch <- prometheus.MustNewConstMetric(descWorkers, prometheus.GaugeValue, float64(alive))
	machines := map[fsm.MachineState]int{fsm.MachineRunning: 0, fsm.MachineStopped: 0, fsm.MachineFailed: 0}
	for _, m := range c.s.store.Machines("") {
		machines[m.State]++
		if m.Crashes > 0 {
			ch <- prometheus.MustNewConstMetric(descCrashes, prometheus.GaugeValue, float64(m.Crashes), m.ID)
		}
	}
	for st, n := range machines {
		ch <- prometheus.MustNewConstMetric(descMachines, prometheus.GaugeValue, float64(n), string(st))
	}
}

// raftMetrics times the leader's writes. hashicorp/raft measures its commit
// time (raft.commitTime) only into go-metrics' process-wide sink, which
// several servers in one process (tests, `ferry agent --dev`) would share;
// timing Apply here is per server and includes what a write waits for:
// the queue, the leader's disk, a quorum's acknowledgement and the apply.
type raftMetrics struct {
	apply prometheus.Histogram
	// failed counts proposals that never committed (timed out, leadership
	// lost): the histogram holds committed ones only.
	failed prometheus.Counter
}

func newRaftMetrics(reg *prometheus.Registry) raftMetrics {
	m := raftMetrics{
		apply: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "ferry_raft_apply_seconds",
			Help: "Leader only: from proposing a command until raft committed it on a quorum and this server applied it.",
			// 1 ms (one fast local disk) to 16 s (past the 10 s proposal timeout).
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 15)}),
		failed: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_raft_apply_failures_total",
			Help: "Leader only: proposals that did not commit (timed out, or leadership lost meanwhile); not in ferry_raft_apply_seconds."}),
	}
	reg.MustRegister(m.apply, m.failed)
	return m
}

// observeApply records one committed command's latency since start.
func (m raftMetrics) observeApply(start time.Time) { m.apply.Observe(time.Since(start).Seconds()) }

func (s *Server) metricsHandler() http.Handler {
	return promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{})
}
