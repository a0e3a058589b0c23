package agent

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics an agent exports on /metrics.
type metrics struct {
	reg              *prometheus.Registry
	steps            *prometheus.CounterVec
	stepFailures     *prometheus.CounterVec
	hydrateRate      *prometheus.GaugeVec
	hydrated         *prometheus.GaugeVec
	stalls           prometheus.Counter
	downtime         prometheus.Histogram
	active           prometheus.Gauge
	fenced           prometheus.Gauge
	crashes          prometheus.Counter
	datapathRestarts prometheus.Counter
	failed           prometheus.Counter
	fenceStops       prometheus.Counter
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
	m.fenced = prometheus.NewGauge(prometheus.GaugeOpts{Name: "ferry_agent_fenced",
		Help: "1 while the agent's lease could not be renewed in time and it fenced itself."})
	m.fenceStops = prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_agent_fence_stops_total",
		Help: "Machines the agent stopped because it fenced itself."})
	m.crashes = prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_agent_machine_crashes_total",
		Help: "Machines found dead while recorded running on this worker."})
	m.failed = prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_agent_machines_failed_total",
		Help: "Machines marked failed after crashing too often within the restart window."})
	m.datapathRestarts = prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_agent_datapath_restarts_total",
		Help: "Volume datapaths found dead under a mounted filesystem and restarted."})
	m.reg.MustRegister(m.datapathRestarts)
	m.reg.MustRegister(m.steps, m.stepFailures, m.hydrateRate, m.hydrated, m.stalls, m.downtime, m.active, m.fenced, m.fenceStops, m.crashes, m.failed)
	return m
}

// ServeMetrics serves /metrics on addr until ctx ends.
func (a *Agent) ServeMetrics(ctx context.Context, addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(a.met.reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
