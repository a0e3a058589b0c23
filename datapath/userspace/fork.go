package userspace

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/internal/hostfs"
	"github.com/ferry-dev/ferry/luks"
)

// snapshotName is the point-in-time ciphertext copy of the source, kept in
// the fork's folder until the fork is re-encrypted from it.
const snapshotName = "source.snapshot"

// Fork copies src into a new volume dst in two steps.
//
// 1. Point in time: the source's filesystem (if mounted) is frozen with
// FIFREEZE, which flushes it down to the ciphertext file; its datapath
// process records the instant (a copy-on-write snapshot: it keeps the old
// content of every region the machine changes from then on, and copies the
// rest in the background) and the filesystem is thawed at once. The source
// pays the freeze for one request to its datapath, whatever the volume's
// size; its first write into each 64 KiB region while the copy runs pays a
// read and a write of that region. A volume not mounted is copied aside
// (`cp --reflink=auto --sparse=always`).
//
// 2. Own key: dst is formatted by cryptsetup (a new master key, dstPass)
// with the source's geometry, and every allocated range of the snapshot is
// decrypted with the source's key and encrypted into dst. Ranges never
// written stay holes in dst too; nothing in ext4 reads them.
func (v *Backend) Fork(ctx context.Context, src string, srcPass []byte, dst string, dstPass []byte) (luks.Layout, datapath.ForkStats, error) {
	var st datapath.ForkStats
	for _, id := range []string{src, dst} {
		if err := checkVolumeName(id); err != nil {
			return luks.Layout{}, st, err
		}
	}
	if src == dst {
		return luks.Layout{}, st, fmt.Errorf("fork volume %s onto itself: name another volume", src)
	}
	srcLayout, err := v.ReadLayout(src)
	if err != nil {
		return luks.Layout{}, st, fmt.Errorf("fork volume %s: %w", src, err)
	}
	if err := os.MkdirAll(v.VolumeDir(dst), 0o700); err != nil {
		return luks.Layout{}, st, fmt.Errorf("fork volume %s: %w", src, err)
	}
	// Absolute: the datapath process writes the point-in-time copy.
	snap, err := filepath.Abs(filepath.Join(v.VolumeDir(dst), snapshotName))
	if err != nil {
		return luks.Layout{}, st, err
	}
	if st.Frozen, st.CopiedBytes, err = v.snapshot(ctx, src, snap); err != nil {
		return luks.Layout{}, st, fmt.Errorf("fork volume %s into %s: %w", src, dst, err)
	}
	layout, n, err := v.reencrypt(ctx, snap, srcLayout, srcPass, dst, dstPass)
	st.Reencrypted = n
	if err != nil {
		return luks.Layout{}, st, fmt.Errorf("fork volume %s into %s: %w", src, dst, err)
	}
	if err := os.Remove(snap); err != nil {
		return luks.Layout{}, st, fmt.Errorf("fork volume %s into %s: remove the snapshot: %w", src, dst, err)
	}
	return layout, st, nil
}

// snapshot copies src's ciphertext to path with src's filesystem frozen.
func (v *Backend) snapshot(ctx context.Context, src, path string) (time.Duration, int64, error) {
	tmp := path + ".tmp"
	_ = os.Remove(tmp)
	mnt := ""
	devs, err := v.servedDevices(src)
	if err != nil {
		return 0, 0, err
	}
	for _, d := range devs {
		if m, ok := mountedFrom(d); ok {
			mnt = m
		}
	}
	var frozen time.Duration
	if mnt != "" {
		p, err := v.Process(ctx, src)
		if err != nil {
			return 0, 0, fmt.Errorf("the datapath serving %s: %w", src, err)
		}
		if frozen, err = v.freezeAndSnapshot(ctx, p, mnt, tmp); err != nil {
			return frozen, 0, err
		}
		if err := waitSnapshot(ctx, p, tmp); err != nil {
			return frozen, 0, err
		}
	} else if err := copySparse(ctx, v.DataPath(src), tmp); err != nil {
		return 0, 0, err
	}
	n, err := allocated(tmp)
	if err != nil {
		return frozen, 0, err
	}
	if err := os.Rename(tmp, path); err != nil {
		return frozen, 0, err
	}
	return frozen, n, nil
}

// freezeAndSnapshot freezes the filesystem at mnt (FIFREEZE flushes it to
// the ciphertext file), has the datapath p record the instant into path,
// and thaws: the filesystem is frozen for that one request.
func (v *Backend) freezeAndSnapshot(ctx context.Context, p *Process, mnt, path string) (time.Duration, error) {
	// A fork that crashed while the filesystem was frozen left it so:
	// thaw first (an error only says it was not frozen).
	_ = exec.CommandContext(ctx, "fsfreeze", "--unfreeze", mnt).Run()
	if out, err := exec.CommandContext(ctx, "fsfreeze", "--freeze", mnt).CombinedOutput(); err != nil {
		return 0, fmt.Errorf("fsfreeze --freeze %s: %w: %s", mnt, err, strings.TrimSpace(string(out)))
	}
	start := time.Now()
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	_, err := p.Snapshot(sctx, path)
	cancel()
	frozen := time.Since(start)
	// Thaw on every path, with a context of its own: a cancelled fork must
	// never leave the machine's filesystem frozen.
	if out, terr := exec.Command("fsfreeze", "--unfreeze", mnt).CombinedOutput(); terr != nil {
		v.Log.Error().Err(terr).Str("mount", mnt).Str("output", string(out)).Msg("thaw after fork snapshot failed: run fsfreeze --unfreeze by hand")
	}
	if err != nil {
		return frozen, fmt.Errorf("point-in-time copy of the frozen volume: %w", err)
	}
	return frozen, nil
}

// waitSnapshot waits for p's point-in-time copy into path to complete.
func waitSnapshot(ctx context.Context, p *Process, path string) error {
	for {
		d, err := p.Detail(ctx)
		if err != nil {
			return fmt.Errorf("point-in-time copy: the datapath: %w", err)
		}
		switch st := d.Snapshot; {
		case st == nil || st.Path != path:
			return errors.New("point-in-time copy: the datapath restarted and lost it; the fork starts over")
		case st.Done && st.Error != "":
			return fmt.Errorf("point-in-time copy: %s", st.Error)
		case st.Done:
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func copySparse(ctx context.Context, from, to string) error {
	out, err := exec.CommandContext(ctx, "cp", "--reflink=auto", "--sparse=always", from, to).CombinedOutput()
	if err != nil {
		return fmt.Errorf("copy %s aside: %w: %s", from, err, strings.TrimSpace(string(out)))
	}
	return nil
}

func allocated(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	rs, err := blockdev.DataRanges(f)
	var n int64
	for _, r := range rs {
		n += r.Len
	}
	return n, err
}

// reencrypt formats dst with the source's geometry and a new master key and
// copies the plaintext of every allocated range of the snapshot into it.
func (v *Backend) reencrypt(ctx context.Context, snap string, srcLayout luks.Layout, srcPass []byte, dst string, dstPass []byte) (luks.Layout, int64, error) {
	_ = os.Remove(v.DataPath(dst))
	f, err := blockdev.CreateSparse(v.DataPath(dst), srcLayout.DeviceSize())
	if err != nil {
		return luks.Layout{}, 0, err
	}
	f.Close()
	err = hostfs.WithKeyFile(v.runDir(), dstPass, func(kf string) error {
		return luks.Format(ctx, v.DataPath(dst), kf, luks.FormatOptions{FastKDF: v.FastKDF,
			MetadataSize: srcLayout.MetadataSize, KeyslotsSize: srcLayout.KeyslotsSize, SectorSize: srcLayout.SectorSize})
	})
	if err != nil {
		return luks.Layout{}, 0, fmt.Errorf("format the fork: %w", err)
	}
	snapDev, err := blockdev.OpenFile(snap, true)
	if err != nil {
		return luks.Layout{}, 0, err
	}
	defer snapDev.Close()
	from, fromLayout, err := luks.OpenHeaderView(snapDev, srcPass)
	if err != nil {
		return luks.Layout{}, 0, fmt.Errorf("open the source snapshot: %w", err)
	}
	defer from.Close()
	dstDev, err := blockdev.OpenFile(v.DataPath(dst), false)
	if err != nil {
		return luks.Layout{}, 0, err
	}
	defer dstDev.Close()
	to, layout, err := luks.OpenHeaderView(dstDev, dstPass)
	if err != nil {
		return luks.Layout{}, 0, fmt.Errorf("open the fork: %w", err)
	}
	defer to.Close()
	if layout.DataOffset != fromLayout.DataOffset || layout.PayloadSize != fromLayout.PayloadSize {
		return luks.Layout{}, 0, fmt.Errorf("the fork's layout (offset %d, %d bytes) differs from the source's (offset %d, %d bytes)",
			layout.DataOffset, layout.PayloadSize, fromLayout.DataOffset, fromLayout.PayloadSize)
	}
	sf, err := os.Open(snap)
	if err != nil {
		return luks.Layout{}, 0, err
	}
	ranges, err := blockdev.DataRanges(sf)
	sf.Close()
	if err != nil {
		return luks.Layout{}, 0, err
	}
	sector := int64(layout.SectorSize)
	buf := make([]byte, 1<<20)
	var n int64
	for _, r := range ranges {
		// Ciphertext range -> plaintext range, whole sectors, inside the segment.
		start := max(r.Off, layout.DataOffset) - layout.DataOffset
		end := min(r.End()-layout.DataOffset, layout.PayloadSize)
		start -= start % sector
		if rem := end % sector; rem != 0 {
			end = min(end+sector-rem, layout.PayloadSize)
		}
		for off := start; off < end; {
			if err := ctx.Err(); err != nil {
				return luks.Layout{}, n, err
			}
			c := buf[:min(int64(len(buf)), end-off)]
			if _, err := from.ReadAt(c, off); err != nil {
				return luks.Layout{}, n, fmt.Errorf("read the snapshot at %d: %w", off, err)
			}
			if _, err := to.WriteAt(c, off); err != nil {
				return luks.Layout{}, n, fmt.Errorf("write the fork at %d: %w", off, err)
			}
			off += int64(len(c))
			n += int64(len(c))
		}
	}
	if err := errors.Join(to.Flush(), dstDev.Flush()); err != nil {
		return luks.Layout{}, n, err
	}
	return layout, n, nil
}
