package e2e

import (
	"fmt"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/machine"
)

// BenchmarkCutoverStartOrder measures the downtime a machine sees (its
// process stopped on the source to its process started on the target, from
// the machine journals) when the target starts it after cutover commits
// (the default) and before (--start-before-cutover, under the self-fence).
//
//	go test -run '^$' -bench CutoverStartOrder -benchtime 5x ./integration/e2e/
func BenchmarkCutoverStartOrder(b *testing.B) {
	for _, mode := range []struct {
		name string
		args []string
	}{
		{"after-commit", nil},
		{"before-commit", []string{"--start-before-cutover"}},
	} {
		b.Run(mode.name, func(b *testing.B) {
			e := newEnv(b, 2, mode.args...)
			var downs []time.Duration
			for i := 0; i < b.N; i++ {
				src, dst := e.ws[0], e.ws[1]
				vol, mach := fmt.Sprintf("sv%d", i), fmt.Sprintf("sm%d", i)
				e.createVolume(vol, src, volSize)
				ack, _ := e.runMachine(mach, src, vol, uint32(60+i))
				e.waitAcked(ack, 20, time.Minute)
				id := e.migrate(mach, dst)
				e.waitState(id, 2*time.Minute, fsm.Cutover, fsm.Hydrating, fsm.Hydrated, fsm.SourceReleased, fsm.Completed)
				d, err := journalDowntime(e, mach, src, dst)
				if err != nil {
					b.Fatal(err)
				}
				downs = append(downs, d)
				e.assertNeverTwice(mach)
				e.waitState(id, 2*time.Minute, fsm.Completed)
			}
			b.StopTimer()
			sort.Slice(downs, func(i, j int) bool { return downs[i] < downs[j] })
			b.ReportMetric(float64(downs[len(downs)/2].Microseconds())/1000, "downtime-median-ms")
			b.Logf("%s downtimes: %v", mode.name, downs)
		})
	}
}

// journalDowntime is the gap between the machine's last stop on src and its
// first start on dst, as the machine driver journaled them.
func journalDowntime(e *env, mach, src, dst string) (time.Duration, error) {
	deadline := time.Now().Add(time.Minute)
	for {
		s, err1 := machine.Journal(filepath.Join(e.bed.WorkerDir(src), "machines"), mach)
		d, err2 := machine.Journal(filepath.Join(e.bed.WorkerDir(dst), "machines"), mach)
		if err1 != nil || err2 != nil {
			return 0, fmt.Errorf("journals of %s: %v %v", mach, err1, err2)
		}
		if len(s) > 0 && !s[len(s)-1].Stop.IsZero() && len(d) > 0 {
			return d[0].Start.Sub(s[len(s)-1].Stop), nil
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("machine %s: no stop on %s followed by a start on %s in the journals", mach, src, dst)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
