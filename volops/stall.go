package volops

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/datapath"
)

// NoProgressReason explains a hydration into vol that stopped moving,
// naming a full destination filesystem when that is the cause.
func (o *Ops) NoProgressReason(vol string, p *datapath.Progress, idle time.Duration) string {
	return noProgressReason(o.vols.VolumeDir(vol), p, idle)
}

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
