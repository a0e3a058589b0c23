package agent

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ferry-dev/ferry/fsm"
)

// metrics an agent exports on /metrics.
type metrics struct {
	reg          *prometheus.Registry
	steps        *prometheus.CounterVec
	stepFailures *prometheus.CounterVec
	hydrateRate  *prometheus.GaugeVec
	hydrated     *prometheus.GaugeVec
	stalls       prometheus.Counter
	downtime     prometheus.Histogram
	active       prometheus.Gauge
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		steps: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_agent_steps_total",
			Help: "Migration steps this agent completed, by state."}, []string{"state"}),
		stepFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_agent_step_failures_total",
			Help: "Failed attempts of migration steps, by state."}, []string{"state"}),
		hydrateRate: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "ferry_agent_hydration_bytes_per_second",
			Help: "Background hydration rate of migrations this agent targets."}, []string{"migration"}),
		hydrated: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "ferry_agent_hydrated_ratio",
			Help: "Hydrated share (0..1) of migrations this agent targets."}, []string{"migration"}),
		stalls: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_agent_stalls_total",
			Help: "Times a migration step was reported stalled."}),
		downtime: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "ferry_agent_downtime_seconds",
			Help:    "Downtime (source stopped to machine started) of migrations this agent cut over.",
			Buckets: []float64{0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30}}),
		active: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ferry_agent_migrations_active",
			Help: "Migrations naming this worker that are not finished."}),
	}
	m.reg.MustRegister(m.steps, m.stepFailures, m.hydrateRate, m.hydrated, m.stalls, m.downtime, m.active)
	return m
}

// Metrics is the agent's registry, its parts' metrics included.
func (a *Agent) Metrics() prometheus.Gatherer { return a.met.reg }

// hydrating sets migration id's hydration gauges from p; nil removes them.
func (m *metrics) hydrating(id string, p *fsm.Progress) {
	if p == nil {
		m.hydrateRate.DeleteLabelValues(id)
		m.hydrated.DeleteLabelValues(id)
		return
	}
	m.hydrateRate.WithLabelValues(id).Set(float64(p.RateBPS))
	if p.TotalBytes > 0 {
		m.hydrated.WithLabelValues(id).Set(float64(p.HydratedBytes) / float64(p.TotalBytes))
	}
}
