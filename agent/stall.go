package agent

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/datapath"
)

// progressWatch notices hydration that stopped moving although the clone
// engine does not call itself stalled: the userspace engine retries a failing
// destination write (a full disk) forever and only marks source failures.
type progressWatch struct {
	last  int64
	since time.Time
}

// stuck reports whether hydrated has not grown for at least after.
func (w *progressWatch) stuck(now time.Time, hydrated int64, after time.Duration) bool {
	if w.since.IsZero() || hydrated != w.last {
		w.last, w.since = hydrated, now
		return false
	}
	return now.Sub(w.since) >= after
}

// noProgressReason explains a hydration that stopped moving, naming a full
// destination filesystem when that is the cause.
func noProgressReason(destDir string, p *datapath.Progress, idle time.Duration) string {
	left := p.TotalBytes - p.HydratedBytes
	var st unix.Statfs_t
	if err := unix.Statfs(destDir, &st); err == nil {
		free := int64(st.Bavail) * int64(st.Bsize)
		if free < 1<<20 || free < left {
			return fmt.Sprintf("no space left for the destination: %d bytes free under %s, up to %d bytes still to hydrate; add space and hydration resumes", free, destDir, left)
		}
	}
	return fmt.Sprintf("hydration made no progress for %v (%d of %d bytes hydrated); see the datapath log", idle.Round(time.Second), p.HydratedBytes, p.TotalBytes)
}
