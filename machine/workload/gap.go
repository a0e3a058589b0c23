package workload

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"os"
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

// PauseAround reads the records file at path and returns the time of the
// last valid record written before at and of the first written after it:
// the machine's pause around a moment (a migration's source_stopped), from
// the times the workload stamped into its records, so it needs no poller.
// A record's time is taken before its write, so the pause until the first
// new record was durable is a little longer (one fsync).
func PauseAround(path string, at time.Time) (last, first time.Time, err error) {
	f, err := os.Open(path)
	if err != nil {
		return last, first, fmt.Errorf("open records %s: %w", path, err)
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 1<<20)
	buf := make([]byte, RecordSize)
	for {
		if _, err := io.ReadFull(r, buf); err != nil {
			break // EOF or a torn tail
		}
		if _, ok := decode(buf); !ok {
			break
		}
		t := time.Unix(0, int64(binary.BigEndian.Uint64(buf[8:])))
		if t.Before(at) {
			last = t
		} else if first.IsZero() {
			first = t
			break
		}
	}
	if last.IsZero() || first.IsZero() {
		return last, first, fmt.Errorf("records %s: no record on both sides of %v", path, at.Format(time.RFC3339Nano))
	}
	return last, first, nil
}
