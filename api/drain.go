package api

import (
	"context"
	"net/http"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// DrainRequest asks the servers to drain a worker: it is cordoned, and the
// leader moves its machines off within the limits until none is left or the
// deadline passes. It returns at once; the drain goes on without the caller.
type DrainRequest struct {
	ID           string   `json:"id,omitempty"` // chosen here when empty, so a retried request is recognised
	Worker       string   `json:"worker"`
	Deadline     Duration `json:"deadline,omitempty"` // 0: none
	Parallel     int      `json:"parallel,omitempty"`
	Targets      []string `json:"targets,omitempty"`
	BandwidthBPS int64    `json:"bandwidth_bps,omitempty"`
}

// Placement is one machine's planned target and why it was chosen.
type Placement struct {
	Machine string `json:"machine"`
	Volume  string `json:"volume"`
	Bytes   int64  `json:"bytes"`
	Target  string `json:"target"`
	Reason  string `json:"reason"`
}

// Unplaced is a machine no target can take now, and the constraint that says so.
type Unplaced struct {
	Machine string `json:"machine"`
	Bytes   int64  `json:"bytes"`
	Reason  string `json:"reason"`
}

// DrainPlan is what a drain would do, computed from the current state
// without changing it.
type DrainPlan struct {
	Worker     string      `json:"worker"`
	Placements []Placement `json:"placements"`
	Unplaced   []Unplaced  `json:"unplaced,omitempty"`
	Elapsed    Duration    `json:"elapsed"` // time the server took to compute it
}

// CordonRequest cordons or uncordons a worker.
type CordonRequest struct {
	Cordoned bool   `json:"cordoned"`
	Reason   string `json:"reason,omitempty"`
}

// Drain records a drain of a worker and returns it (running).
func (c *Client) Drain(ctx context.Context, r DrainRequest) (*fsm.Drain, error) {
	if r.ID == "" {
		r.ID = NewStepID("drain-")
	}
	var d fsm.Drain
	_, err := c.do(ctx, http.MethodPost, "/v1/drains", nil, r, &d)
	return &d, err
}

// PlanDrain returns the placements a drain of r.Worker would make now.
func (c *Client) PlanDrain(ctx context.Context, r DrainRequest) (*DrainPlan, error) {
	var p DrainPlan
	_, err := c.do(ctx, http.MethodPost, "/v1/drains/plan", nil, r, &p)
	return &p, err
}

// CancelDrain stops the running drain of worker; migrations already
// running go on, and the worker stays cordoned.
func (c *Client) CancelDrain(ctx context.Context, worker string) (*fsm.Drain, error) {
	var d fsm.Drain
	_, err := c.do(ctx, http.MethodDelete, "/v1/drains/"+esc(worker), nil, nil, &d)
	return &d, err
}

// ListDrains returns the drains (of worker, all when empty), newest first.
func (c *Client) ListDrains(ctx context.Context, worker string) ([]*fsm.Drain, error) {
	r, _, err := c.WatchDrains(ctx, worker, 0, 0)
	return r, err
}

// WatchDrains blocks until a drain changes after index (or wait passes).
func (c *Client) WatchDrains(ctx context.Context, worker string, index uint64, wait time.Duration) ([]*fsm.Drain, uint64, error) {
	var r []*fsm.Drain
	idx, err := c.do(ctx, http.MethodGet, "/v1/drains", watchQuery(worker, index, wait), nil, &r)
	return r, idx, err
}

// Cordon stops new placements on a worker (or, with cordoned false, allows them again).
func (c *Client) Cordon(ctx context.Context, worker string, cordoned bool, reason string) (*fsm.Worker, error) {
	var w fsm.Worker
	_, err := c.do(ctx, http.MethodPost, "/v1/workers/"+esc(worker)+"/cordon", nil, CordonRequest{Cordoned: cordoned, Reason: reason}, &w)
	return &w, err
}

// HeartbeatReport extends a worker's lease and reports its capacity.
func (c *Client) HeartbeatReport(ctx context.Context, name string, ttl time.Duration, rep *fsm.WorkerReport) (*fsm.Worker, error) {
	var r fsm.Worker
	_, err := c.do(ctx, http.MethodPost, "/v1/workers/"+esc(name)+"/heartbeat", nil, HeartbeatRequest{LeaseTTL: Duration(ttl), Report: rep}, &r)
	return &r, err
}
