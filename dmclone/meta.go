package dmclone

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"

	"golang.org/x/sys/unix"
)

// The metadata file holds two slots, each a 4 KiB header followed by the
// region bitmap. Commits alternate between the slots; a torn write can only
// damage the slot being written, so the other (older, complete) one stays
// valid and loading picks the valid slot with the highest sequence number.
// This is how dm-clone's metadata behaves: crash-consistent like a disk with
// a volatile write cache.

const (
	metaMagic     = "FERRYCLN"
	metaVersion   = 1
	metaHeaderLen = 4096
	// Field offsets inside the header.
	offVersion   = 8
	offSeq       = 12
	offRegion    = 20
	offSize      = 28
	offRegions   = 36
	offFetched   = 44
	offDiscard   = 52
	offKnownZero = 60
	offWritten   = 68
	offCRC       = 76
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// ErrMetadata is returned when the metadata file is damaged or belongs to
// other devices.
var ErrMetadata = errors.New("clone metadata")

// metaState is what one slot records.
type metaState struct {
	seq        uint64
	regionSize int64
	size       int64
	regions    int64
	counters   counters
	bits       bitmap
}

// counters persist with the bitmap so progress survives a restart.
type counters struct {
	Fetched          int64 // bytes read from the source
	SkippedDiscard   int64 // bytes marked hydrated by discards
	SkippedKnownZero int64 // bytes marked hydrated by the known-zero hint
	SkippedWrite     int64 // bytes marked hydrated by whole-region writes
}

func bitmapBytes(regions int64) int64 { return (regions + 63) / 64 * 8 }

func slotSize(regions int64) int64 {
	return metaHeaderLen + (bitmapBytes(regions)+4095)/4096*4096
}

// encodeSlot serialises a state into one slot image.
func encodeSlot(s *metaState) []byte {
	img := make([]byte, slotSize(s.regions)-metaHeaderLen)
	encodeWords(img, s.bits, 0, int64(len(s.bits)))
	return append(encodeHeader(s, img[:bitmapBytes(s.regions)]), img...)
}

// encodeHeader serialises a slot's header; its checksum covers bm, the
// slot's bitmap as encoded.
func encodeHeader(s *metaState, bm []byte) []byte {
	buf := make([]byte, metaHeaderLen)
	copy(buf, metaMagic)
	le := binary.LittleEndian
	le.PutUint32(buf[offVersion:], metaVersion)
	le.PutUint64(buf[offSeq:], s.seq)
	le.PutUint64(buf[offRegion:], uint64(s.regionSize))
	le.PutUint64(buf[offSize:], uint64(s.size))
	le.PutUint64(buf[offRegions:], uint64(s.regions))
	le.PutUint64(buf[offFetched:], uint64(s.counters.Fetched))
	le.PutUint64(buf[offDiscard:], uint64(s.counters.SkippedDiscard))
	le.PutUint64(buf[offKnownZero:], uint64(s.counters.SkippedKnownZero))
	le.PutUint64(buf[offWritten:], uint64(s.counters.SkippedWrite))
	crc := crc32.Update(crc32.Checksum(buf[:offCRC], crcTable), crcTable, bm)
	le.PutUint32(buf[offCRC:], crc)
	return buf
}

// encodeWords writes words [w0,w1) of bits into img, the encoded bitmap.
func encodeWords(img []byte, bits bitmap, w0, w1 int64) {
	for w := w0; w < w1; w++ {
		binary.LittleEndian.PutUint64(img[w*8:], bits[w])
	}
}

// decodeSlot parses and verifies one slot image. It never panics on bad
// input: every length comes from the checked header.
func decodeSlot(buf []byte) (*metaState, error) {
	if len(buf) < metaHeaderLen || string(buf[:8]) != metaMagic {
		return nil, fmt.Errorf("%w: no slot header", ErrMetadata)
	}
	le := binary.LittleEndian
	if v := le.Uint32(buf[offVersion:]); v != metaVersion {
		return nil, fmt.Errorf("%w: version %d, this ferry reads version %d", ErrMetadata, v, metaVersion)
	}
	s := &metaState{
		seq:        le.Uint64(buf[offSeq:]),
		regionSize: int64(le.Uint64(buf[offRegion:])),
		size:       int64(le.Uint64(buf[offSize:])),
		regions:    int64(le.Uint64(buf[offRegions:])),
	}
	if err := validRegionSize(s.regionSize); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMetadata, err)
	}
	if s.size <= 0 || s.regions != (s.size+s.regionSize-1)/s.regionSize || s.regions > maxRegions {
		return nil, fmt.Errorf("%w: size %d and %d regions of %d bytes disagree", ErrMetadata, s.size, s.regions, s.regionSize)
	}
	nb := bitmapBytes(s.regions)
	if int64(len(buf)) < metaHeaderLen+nb {
		return nil, fmt.Errorf("%w: slot truncated", ErrMetadata)
	}
	bm := buf[metaHeaderLen : metaHeaderLen+nb]
	crc := crc32.Update(crc32.Checksum(buf[:offCRC], crcTable), crcTable, bm)
	if crc != le.Uint32(buf[offCRC:]) {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrMetadata)
	}
	s.counters = counters{
		Fetched:          int64(le.Uint64(buf[offFetched:])),
		SkippedDiscard:   int64(le.Uint64(buf[offDiscard:])),
		SkippedKnownZero: int64(le.Uint64(buf[offKnownZero:])),
		SkippedWrite:     int64(le.Uint64(buf[offWritten:])),
	}
	s.bits = newBitmap(s.regions)
	for i := range s.bits {
		s.bits[i] = le.Uint64(bm[i*8:])
	}
	// Bits past the last region must be clear, or counts would be wrong.
	if rem := s.regions & 63; rem != 0 && s.bits[len(s.bits)-1]>>uint(rem) != 0 {
		return nil, fmt.Errorf("%w: bits set past the last region", ErrMetadata)
	}
	return s, nil
}

// wordsPerPage is how many bitmap words one 4 KiB metadata page holds.
const wordsPerPage = 4096 / 8

// metaFile is the open metadata file.
type metaFile struct {
	f       *os.File
	regions int64
	seq     uint64
	// For each slot: whether this process wrote it whole, and the engine
	// version it then held. Pages unchanged since need no rewrite.
	slotOK  [2]bool
	slotVer [2]uint64
	// img is the bitmap as encoded at engine version imgVer, kept between
	// commits: a commit re-encodes only the pages changed since (under
	// the engine's lock), so at 20 GiB (640 KiB of bitmap) it no longer
	// copies and encodes the whole bitmap, 2-5 ms each under load, while
	// the machine's I/O waits for the lock.
	img    []byte
	imgVer uint64
}

// newImage sets the encoded bitmap to bits, as of engine version 0, in
// m.img when it is already an all-zero buffer of the slot's size
// (Prealloc).
func (m *metaFile) newImage(bits bitmap) {
	if n := slotSize(m.regions) - metaHeaderLen; int64(len(m.img)) != n {
		m.img = make([]byte, n)
	}
	for w, v := range bits {
		if v != 0 { // a new clone's are all zero, as the image is
			binary.LittleEndian.PutUint64(m.img[w*8:], v)
		}
	}
	m.imgVer = 0
}

// refresh re-encodes the pages of bits changed after the image's version
// (pageVer: per page, the version of its last change) and makes the image
// that of ver. The caller holds the engine's lock.
func (m *metaFile) refresh(bits bitmap, pageVer []uint64, ver uint64) {
	for p, v := range pageVer {
		if v > m.imgVer {
			w0 := int64(p) * wordsPerPage
			encodeWords(m.img, bits, w0, min(w0+wordsPerPage, int64(len(bits))))
		}
	}
	m.imgVer = ver
}

// openMeta opens or creates path. It returns the newest valid state, or nil
// when the file is new (empty). A non-empty file with no valid slot is an
// error: starting over would read stale source data over the workload's writes.
func openMeta(path string, regions int64) (*metaFile, *metaState, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("open clone metadata %s: %w", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("clone metadata %s is in use by another process (%w): stop that clone first", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("stat clone metadata %s: %w", path, err)
	}
	m := &metaFile{f: f, regions: regions}
	if st.Size() == 0 {
		return m, nil, nil
	}
	var best *metaState
	var firstErr error
	for slot := int64(0); slot < 2; slot++ {
		s, err := readSlot(f, slot, regions, st.Size())
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		if best == nil || s.seq > best.seq {
			best = s
		}
	}
	if best == nil {
		f.Close()
		return nil, nil, fmt.Errorf("clone metadata %s has no valid slot (%w); it is damaged or not a ferry clone metadata file: remove the clone and start over from the source", path, firstErr)
	}
	m.seq = best.seq
	return m, best, nil
}

func readSlot(f *os.File, slot, regions, fileSize int64) (*metaState, error) {
	n := slotSize(regions)
	off := slot * n
	if off+n > fileSize {
		return nil, fmt.Errorf("%w: slot %d outside the file (metadata of a device with another size or region size?)", ErrMetadata, slot)
	}
	buf := make([]byte, n)
	if _, err := f.ReadAt(buf, off); err != nil {
		return nil, fmt.Errorf("read metadata slot %d: %w", slot, err)
	}
	return decodeSlot(buf)
}

// commit writes the header s and the image (the bitmap as of engine
// version ver, refreshed by the caller) into the slot not holding the
// newest state and syncs it. Only the header and the bitmap pages changed
// since this process last wrote that slot are written (pageVer: per page,
// the version of its last change), so a flush-heavy workload does not
// rewrite megabytes of bitmap per fsync. The checksum in the header covers
// the whole bitmap, so a torn commit leaves the slot invalid and loading
// uses the other one.
func (m *metaFile) commit(s *metaState, ver uint64, pageVer []uint64) error {
	m.seq++
	s.seq = m.seq
	slot := int(m.seq % 2)
	hdr := encodeHeader(s, m.img[:bitmapBytes(m.regions)])
	base := int64(slot) * slotSize(m.regions)
	full := !m.slotOK[slot] || pageVer == nil
	writes := [][2]int64{{0, metaHeaderLen}}
	if full {
		writes = append(writes, [2]int64{metaHeaderLen, slotSize(m.regions)})
	} else {
		for p := 0; p < len(pageVer); {
			if pageVer[p] <= m.slotVer[slot] {
				p++
				continue
			}
			q := p + 1
			for q < len(pageVer) && pageVer[q] > m.slotVer[slot] {
				q++
			}
			writes = append(writes, [2]int64{metaHeaderLen + int64(p)*4096, metaHeaderLen + int64(q)*4096})
			p = q
		}
	}
	m.slotOK[slot] = false // until this commit is complete
	for _, w := range writes {
		b := hdr
		if w[0] >= metaHeaderLen {
			b = m.img[w[0]-metaHeaderLen : w[1]-metaHeaderLen]
		}
		if _, err := m.f.WriteAt(b, base+w[0]); err != nil {
			return fmt.Errorf("write clone metadata: %w", err)
		}
	}
	if err := unix.Fdatasync(int(m.f.Fd())); err != nil {
		return fmt.Errorf("sync clone metadata: %w", err)
	}
	m.slotOK[slot], m.slotVer[slot] = true, ver
	return nil
}

func (m *metaFile) close() error { return m.f.Close() }
