package chaos

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/ferry-dev/ferry/machine/workload"
	"github.com/ferry-dev/ferry/netrewrite"
)

// observer is the independent check of invariant 2, outside ferry: from the
// control namespace it asks the machine, over each of its 6PN addresses,
// which worker it runs on, every interval; two different answers in one
// round are a violation (the machine ran twice). It trusts nothing ferry
// records: only what answers on the network.
type observer struct {
	interval time.Duration
	mu       sync.Mutex
	addrs    []string
	rounds   int
	answers  map[string]int // worker -> answers
	viol     []string
	stop     chan struct{}
	done     chan struct{}
}

// observe starts probing machineID's addresses: its current one and the
// one it gets on each other worker (a migration's new address).
func (c *cluster) observe(machineID string) *observer {
	c.t.Helper()
	m, err := c.bed.Client.GetMachine(c.ctx, machineID)
	if err != nil {
		c.t.Fatal(err)
	}
	old, err := netrewrite.Parse(m.Addr6PN)
	if err != nil {
		c.t.Fatal(err)
	}
	o := &observer{interval: 50 * time.Millisecond, answers: map[string]int{}, stop: make(chan struct{}), done: make(chan struct{})}
	o.addrs = append(o.addrs, old.String())
	for _, w := range c.ws {
		if a, err := old.WithHost(c.bed.HostID(w)); err == nil && a.String() != old.String() {
			o.addrs = append(o.addrs, a.String())
		}
	}
	dial := c.bed.DialIn("ctl")
	go func() {
		defer close(o.done)
		t := time.NewTicker(o.interval)
		defer t.Stop()
		for {
			select {
			case <-o.stop:
				return
			case <-t.C:
			}
			o.round(c.ctx, dial)
		}
	}()
	return o
}

// round asks every address at once and compares the answers.
func (o *observer) round(ctx context.Context, dial func(ctx context.Context, network, addr string) (net.Conn, error)) {
	ctx, cancel := context.WithTimeout(ctx, o.interval)
	defer cancel()
	var wg sync.WaitGroup
	got := make([]string, len(o.addrs))
	for i, a := range o.addrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i] = ask(ctx, dial, a)
		}()
	}
	wg.Wait()
	seen := map[string]string{}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.rounds++
	for i, w := range got {
		if w == "" {
			continue
		}
		o.answers[w]++
		seen[w] = o.addrs[i]
	}
	if len(seen) > 1 {
		var parts []string
		for w, a := range seen {
			parts = append(parts, w+" at "+a)
		}
		o.viol = append(o.viol, fmt.Sprintf("%s: %s", time.Now().Format("15:04:05.000"), strings.Join(parts, " and ")))
	}
}

func ask(ctx context.Context, dial func(ctx context.Context, network, addr string) (net.Conn, error), addr string) string {
	c, err := dial(ctx, "tcp", net.JoinHostPort(addr, "7000"))
	if err != nil {
		return ""
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	if _, err := c.Write([]byte(workload.WhoQuestion)); err != nil {
		return ""
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return ""
	}
	return strings.TrimSpace(line)
}

// close stops probing and returns the violations, the rounds and who answered.
func (o *observer) close() (viol []string, rounds int, answers map[string]int) {
	close(o.stop)
	<-o.done
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.viol, o.rounds, o.answers
}

// check fails the test on any violation and says what was observed.
func (c *cluster) checkObserved(o *observer) string {
	c.t.Helper()
	viol, rounds, answers := o.close()
	if len(viol) > 0 {
		c.t.Fatalf("observer: the machine answered from two workers at once (%d times), first: %s", len(viol), viol[0])
	}
	if rounds < 10 {
		c.t.Fatalf("observer ran only %d rounds", rounds)
	}
	total := 0
	for _, n := range answers {
		total += n
	}
	if total == 0 {
		c.t.Fatalf("observer: the machine never answered in %d rounds over %v", rounds, o.addrs)
	}
	return fmt.Sprintf("%d rounds, answers %v", rounds, answers)
}
