package netrewrite

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/ipv6"
)

const probePort = 7001

// udpEcho answers every datagram with "name:payload", from the address the
// datagram was sent to (IPV6_PKTINFO), as a well-behaved UDP server on a
// multi-address host does.
func (w *world) udpEcho(ns, name string) {
	w.t.Helper()
	var c net.PacketConn
	if err := RunInNS(ns, func() (err error) {
		c, err = net.ListenPacket("udp6", fmt.Sprintf("[::]:%d", probePort))
		return err
	}); err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { c.Close() })
	p := ipv6.NewPacketConn(c)
	if err := p.SetControlMessage(ipv6.FlagDst, true); err != nil {
		w.t.Fatal(err)
	}
	go func() {
		buf := make([]byte, 64)
		for {
			n, cm, from, err := p.ReadFrom(buf)
			if err != nil {
				return
			}
			var reply *ipv6.ControlMessage
			if cm != nil {
				reply = &ipv6.ControlMessage{Src: cm.Dst}
			}
			p.WriteTo([]byte(name+":"+string(buf[:n])), reply, from)
		}
	}()
}

type probeResult struct {
	sent, fromSource, fromTarget int
	// outage is the longest stretch of sent-but-unanswered probes: the send
	// time of the first answered probe after a run of lost ones minus that
	// of the last answered probe before it. Probes the peer never sent (the
	// process descheduled on a loaded host) do not count as an outage.
	outage time.Duration
	// maxGap is the longest time between two replies as received, which
	// also includes scheduling delays of the test process.
	maxGap time.Duration
}

// probe sends a numbered datagram every interval from the peer to addr until
// stop is closed, and records which probes were answered, and by whom.
func (w *world) probe(addr Addr, interval time.Duration, stop <-chan struct{}) <-chan probeResult {
	w.t.Helper()
	var c *net.UDPConn
	if err := RunInNS(w.peer, func() (err error) {
		c, err = net.DialUDP("udp6", nil, &net.UDPAddr{IP: addr.IP().AsSlice(), Port: probePort})
		return err
	}); err != nil {
		w.t.Fatal(err)
	}
	res := make(chan probeResult, 1)
	var mu sync.Mutex
	var r probeResult
	var last time.Time
	var sentAt []time.Time
	answered := map[int]bool{}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // receiver
		defer wg.Done()
		buf := make([]byte, 64)
		for {
			n, err := c.Read(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				// ICMP port unreachable (the machine not listening yet)
				// surfaces as ECONNREFUSED on a connected socket: a lost probe.
				continue
			}
			now := time.Now()
			name, seqText, _ := strings.Cut(string(buf[:n]), ":")
			seq, _ := strconv.Atoi(seqText)
			mu.Lock()
			if !last.IsZero() && now.Sub(last) > r.maxGap {
				r.maxGap = now.Sub(last)
			}
			last = now
			answered[seq] = true
			if name == "source" {
				r.fromSource++
			} else if name == "target" {
				r.fromTarget++
			}
			mu.Unlock()
		}
	}()
	go func() { // sender
		t := time.NewTicker(interval)
		defer t.Stop()
		for seq := 0; ; seq++ {
			select {
			case <-stop:
				time.Sleep(50 * time.Millisecond) // let the last replies arrive
				c.Close()
				wg.Wait()
				mu.Lock()
				r.sent = seq
				prev := -1
				for i := 0; i < seq; i++ {
					if !answered[i] {
						continue
					}
					if prev >= 0 && i-prev > 1 && sentAt[i].Sub(sentAt[prev]) > r.outage {
						r.outage = sentAt[i].Sub(sentAt[prev])
					}
					prev = i
				}
				res <- r
				mu.Unlock()
				return
			case <-t.C:
				mu.Lock()
				sentAt = append(sentAt, time.Now())
				mu.Unlock()
				c.Write([]byte(strconv.Itoa(seq)))
			}
		}
	}()
	return res
}

// TestCutoverInterruption measures, for each mode, how long applying the
// cutover rewrite takes (target step + source step) and the longest gap in
// replies seen by a peer that keeps sending to the old address every 1 ms
// across the cutover. The source's responder runs until its address is
// removed, so the gap is the network rewrite's alone (a real migration adds
// the machine's stop/start on top).
func TestCutoverInterruption(t *testing.T) {
	for _, mode := range []Mode{ModeAlias, ModeNAT} {
		t.Run(string(mode), func(t *testing.T) {
			if mode == ModeNAT {
				needNFT(t)
			}
			w := newWorld(t)
			sp, tp := w.plans(mode)
			if err := SetupMachineNet(w.ctx, w.log, sp.Machine); err != nil {
				t.Fatal(err)
			}
			w.udpEcho(sp.Machine.MachineNS, "source")
			// The agent prepares the target machine's network before cutover
			// (a new veth may take up to 1 s to carry traffic); cutover then
			// only adds the mapping. BenchmarkCutoverApply/cold times it all.
			if err := SetupMachineNet(w.ctx, w.log, tp.Machine); err != nil {
				t.Fatal(err)
			}
			stop := make(chan struct{})
			done := w.probe(sp.Machine.Addr, time.Millisecond, stop)
			time.Sleep(300 * time.Millisecond)

			start := time.Now()
			if err := CutoverTarget(w.ctx, w.log, tp); err != nil {
				t.Fatal(err)
			}
			targetTook := time.Since(start)
			// The machine starts on the target (outside the timed steps).
			w.udpEcho(tp.Machine.MachineNS, "target")
			start = time.Now()
			if err := CutoverSource(w.ctx, w.log, sp); err != nil {
				t.Fatal(err)
			}
			sourceTook := time.Since(start)

			time.Sleep(300 * time.Millisecond)
			close(stop)
			r := <-done
			t.Logf("mode=%s apply: target %.1f ms + source %.1f ms = %.1f ms; peer (1 ms probes to old address): "+
				"outage %.1f ms (max reply gap %.1f ms), sent %d, replies source %d target %d, lost %d",
				mode, ms(targetTook), ms(sourceTook), ms(targetTook+sourceTook), ms(r.outage), ms(r.maxGap),
				r.sent, r.fromSource, r.fromTarget, r.sent-r.fromSource-r.fromTarget)
			if r.fromSource == 0 || r.fromTarget == 0 {
				t.Fatalf("peer got %d replies from the source and %d from the target; want both", r.fromSource, r.fromTarget)
			}
			if r.outage > time.Second {
				t.Fatalf("peer's probes to the old address went unanswered for %v", r.outage)
			}
		})
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// BenchmarkCutoverApply times CutoverTarget + CutoverSource; rollback
// between iterations is not timed. "warm": the target machine's network was
// prepared (SetupMachineNet) before cutover, so cutover adds the mapping and
// swaps the source route; "cold": cutover also creates the target's machine
// namespace and veth and waits for the veth to carry traffic.
//
//	go test -run '^$' -bench CutoverApply -benchtime 20x ./netrewrite/
func BenchmarkCutoverApply(b *testing.B) {
	for _, mode := range []Mode{ModeAlias, ModeNAT} {
		for _, warm := range []bool{true, false} {
			name := string(mode) + "/cold"
			if warm {
				name = string(mode) + "/warm"
			}
			b.Run(name, func(b *testing.B) {
				if mode == ModeNAT {
					needNFT(b)
				}
				w := newWorld(b)
				sp, tp := w.plans(mode)
				if err := SetupMachineNet(w.ctx, w.log, sp.Machine); err != nil {
					b.Fatal(err)
				}
				prepare := func() {
					if warm {
						if err := SetupMachineNet(w.ctx, w.log, tp.Machine); err != nil {
							b.Fatal(err)
						}
					}
				}
				prepare()
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if err := CutoverTarget(w.ctx, w.log, tp); err != nil {
						b.Fatal(err)
					}
					if err := CutoverSource(w.ctx, w.log, sp); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					if err := RollbackTarget(w.ctx, w.log, tp); err != nil {
						b.Fatal(err)
					}
					if err := RollbackSource(w.ctx, w.log, sp); err != nil {
						b.Fatal(err)
					}
					prepare()
					b.StartTimer()
				}
			})
		}
	}
}
