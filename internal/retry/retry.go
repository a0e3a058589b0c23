// Package retry is ferry's one backoff policy: exponential, capped and
// jittered (cenkalti/backoff), so that after a server failover agents do not
// retry in lockstep. Every retry loop in the agent, the API client, the data
// path and hydration takes its delays from here.
package retry

import (
	"context"
	"time"

	"github.com/cenkalti/backoff/v5"
)

// Jitter is the randomization factor: each delay is drawn from
// [d*(1-Jitter), d*(1+Jitter)].
const Jitter = 0.5

// Backoff yields jittered delays that double from first up to max.
type Backoff struct {
	b *backoff.ExponentialBackOff
}

// New returns a backoff starting near first and never (before jitter)
// exceeding max. first <= 0 means 100ms; max < first means first.
func New(first, max time.Duration) *Backoff {
	if first <= 0 {
		first = 100 * time.Millisecond
	}
	if max < first {
		max = first
	}
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = first
	b.MaxInterval = max
	b.Multiplier = 2
	b.RandomizationFactor = Jitter
	b.Reset()
	return &Backoff{b: b}
}

// Next returns the next delay. It is never more than max*(1+Jitter).
func (b *Backoff) Next() time.Duration { return b.b.NextBackOff() }

// Reset starts again from the first delay (after a success).
func (b *Backoff) Reset() { b.b.Reset() }

// Wait sleeps for the next delay; false when ctx ended first.
func (b *Backoff) Wait(ctx context.Context) bool { return Sleep(ctx, b.Next()) }

// Sleep waits d or until ctx ends; false when ctx ended.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// Do calls fn until it succeeds, ctx ends or fn's error is marked
// Permanent, waiting a jittered backoff between attempts. onErr (optional)
// sees every failure with the delay before the next attempt.
func Do(ctx context.Context, first, max time.Duration, fn func() error, onErr func(err error, next time.Duration)) error {
	b := New(first, max)
	for {
		err := fn()
		if err == nil {
			return nil
		}
		if p, ok := err.(*permanent); ok {
			return p.err
		}
		d := b.Next()
		if onErr != nil {
			onErr(err, d)
		}
		if !Sleep(ctx, d) {
			return err
		}
	}
}

type permanent struct{ err error }

func (p *permanent) Error() string { return p.err.Error() }
func (p *permanent) Unwrap() error { return p.err }

// Permanent marks err so Do stops retrying and returns it.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &permanent{err: err}
}
