package workload

import (
	"sync"
	"time"
)

// GapWatch measures downtime as the machine sees it: the longest time
// between two increases of the acknowledged record count. It polls the ack
// file, so a gap reads up to one poll interval long.
type GapWatch struct {
	ackFile string
	every   time.Duration
	stop    chan struct{}
	done    chan struct{}

	mu      sync.Mutex
	longest time.Duration
	lastAt  time.Time
	last    uint64
}

// WatchGaps starts polling ackFile every interval (5 ms when zero or less).
func WatchGaps(ackFile string, every time.Duration) *GapWatch {
	if every <= 0 {
		every = 5 * time.Millisecond
	}
	g := &GapWatch{ackFile: ackFile, every: every, stop: make(chan struct{}), done: make(chan struct{})}
	g.last, _ = Acked(ackFile)
	g.lastAt = time.Now()
	go g.run()
	return g
}

func (g *GapWatch) run() {
	defer close(g.done)
	t := time.NewTicker(g.every)
	defer t.Stop()
	for {
		select {
		case <-g.stop:
			return
		case <-t.C:
		}
		// A read error (the file being rewritten) counts as no new record.
		a, err := Acked(g.ackFile)
		if err != nil || a <= g.last {
			continue
		}
		now := time.Now()
		g.mu.Lock()
		g.longest = max(g.longest, now.Sub(g.lastAt))
		g.last, g.lastAt = a, now
		g.mu.Unlock()
	}
}

// Longest is the longest gap so far, counting the one still open: a machine
// that has not written since is still down.
func (g *GapWatch) Longest() time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	return max(g.longest, time.Since(g.lastAt))
}

// Stop ends the polling and returns Longest. Call it once the machine has
// written again, or the open gap runs up to the call.
func (g *GapWatch) Stop() time.Duration {
	select {
	case <-g.stop:
	default:
		close(g.stop)
	}
	<-g.done
	return g.Longest()
}
