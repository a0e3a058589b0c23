package luks

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"

	"github.com/ferry-dev/ferry/blockdev"
)

// maxImageBytes bounds a header image's keyslot material: 32 keyslots of
// cryptsetup's 512-bit, 4000-stripe default take 8 000 000 bytes. A header
// asking for more is opened from its device instead.
const maxImageBytes = 8 << 20

// ErrNotInImage: a read asked a header image for bytes it did not keep.
var ErrNotInImage = errors.New("bytes outside the LUKS2 header image")

// A HeaderImage is a volume's LUKS2 header (both copies as read) and the
// anti-forensic material of every keyslot bound to its data segment, read
// into memory once. A clone's target reads it from the source's export
// before the source's machine stops (the header and keyslots are written
// only by ferry's own key operations, never by the machine, which writes
// past the data offset), so that unlocking in the machine's pause reads
// nothing over the network. What it yields is checked as a header read in
// the pause is: the carried layout, the unlock budget and the key's digest.
type HeaderImage struct {
	h     *Header
	size  int64
	spans []imageSpan // sorted by offset
}

type imageSpan struct {
	off int64
	b   []byte
}

// ReadHeaderImage reads the header on r (a device of size bytes) and the
// keyslot material Unlock would read, refusing a header dearer to unlock
// than Unlock's budget before reading any keyslot. With ahead > 0 it first
// reads the device's first ahead bytes in one request and reads again only
// what they do not hold: over a network, one request of a few hundred KiB
// costs less than the five a header and a keyslot take one after another.
func ReadHeaderImage(r io.ReaderAt, size, ahead int64) (*HeaderImage, error) {
	im := &HeaderImage{size: size}
	rec := imageRecorder{r: r, im: im}
	if ahead = min(ahead, size, maxImageBytes); ahead > 0 {
		if _, err := rec.ReadAt(make([]byte, ahead), 0); err != nil {
			return nil, fmt.Errorf("read the first %d bytes of the device: %w", ahead, err)
		}
	}
	h, err := ReadHeader(rec, size)
	if err != nil {
		return nil, err
	}
	if err := h.CheckUnlockCost(); err != nil {
		return nil, err
	}
	im.h = h
	ids, err := h.dataKeyslots()
	if err != nil {
		return nil, err
	}
	material := 0
	for _, kID := range ids {
		ks := h.Meta.Keyslots[kID]
		n, err := afReadLen(ks)
		if err != nil {
			return nil, fmt.Errorf("keyslot %s: %w", kID, err)
		}
		if material += n; material > maxImageBytes {
			return nil, fmt.Errorf("the keyslots bound to the data segment hold more than %d bytes: too large for a header image", maxImageBytes)
		}
		if _, err := rec.ReadAt(make([]byte, n), ks.Area.Offset); err != nil {
			return nil, fmt.Errorf("read keyslot %s's area at %d: %w", kID, ks.Area.Offset, err)
		}
	}
	sort.Slice(im.spans, func(i, j int) bool { return im.spans[i].off < im.spans[j].off })
	return im, nil
}

// dataKeyslots lists, once each, the keyslots Unlock may try: those of
// the digests bound to the data segment.
func (h *Header) dataKeyslots() ([]string, error) {
	segID, _, err := h.DataSegment()
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, dID := range sortedIDs(h.Meta.Digests) {
		d := h.Meta.Digests[dID]
		if !contains(d.Segments, segID) {
			continue
		}
		for _, kID := range d.Keyslots {
			if h.Meta.Keyslots[kID] != nil && !slices.Contains(ids, kID) {
				ids = append(ids, kID)
			}
		}
	}
	return ids, nil
}

// imageRecorder keeps every read it passes on.
type imageRecorder struct {
	r  io.ReaderAt
	im *HeaderImage
}

func (rec imageRecorder) ReadAt(p []byte, off int64) (int, error) {
	if n, err := rec.im.ReadAt(p, off); err == nil {
		return n, nil
	}
	n, err := rec.r.ReadAt(p, off)
	if n > 0 {
		rec.im.spans = append(rec.im.spans, imageSpan{off: off, b: append([]byte(nil), p[:n]...)})
	}
	return n, err
}

// ReadAt serves p from one kept read that covers it, or refuses.
func (im *HeaderImage) ReadAt(p []byte, off int64) (int, error) {
	for _, s := range im.spans {
		if off >= s.off && off+int64(len(p)) <= s.off+int64(len(s.b)) {
			return copy(p, s.b[off-s.off:]), nil
		}
	}
	return 0, fmt.Errorf("%d bytes at %d: %w", len(p), off, ErrNotInImage)
}

// Header is the header the image holds.
func (im *HeaderImage) Header() *Header { return im.h }

// OpenCarriedView is OpenCarriedView with the header and keyslots taken
// from the image, not from dev: dev must be the device the image was read
// from (its size), the header must match the carried layout, and the key
// it yields must match the header's digest. Only the view's I/O reaches dev.
func (im *HeaderImage) OpenCarriedView(dev blockdev.Device, layout Layout, passphrase []byte) (blockdev.Device, error) {
	if dev.Size() != im.size {
		return nil, fmt.Errorf("the header image was read from a device of %d bytes, this one has %d", im.size, dev.Size())
	}
	if _, err := im.h.MatchLayout(layout, dev.Size()); err != nil {
		return nil, err
	}
	vk, err := im.h.Unlock(im, passphrase)
	if err != nil {
		return nil, err
	}
	defer vk.Wipe()
	return openView(dev, layout, vk)
}

// Wipe drops the image's bytes (keyslot material is key material sealed
// by the passphrase; it is not kept longer than needed).
func (im *HeaderImage) Wipe() {
	if im == nil {
		return
	}
	for _, s := range im.spans {
		clear(s.b)
	}
	im.spans = nil
}
