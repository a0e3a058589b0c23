package luks

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/ferry-dev/ferry/blockdev"
)

// ivUnit is the size of the unit the plain64 IV counts. cryptsetup maps a
// LUKS2 segment with "sector_size:N" but without dm-crypt's
// iv_large_sectors flag (that flag is only set for plain and BitLocker
// devices), so the IV of an N-byte sector is its offset in the segment in
// 512-byte units plus iv_tweak: 0, 8, 16 … for 4096-byte sectors. Offline
// `cryptsetup reencrypt --encrypt` (cryptsetup's own userspace cipher) makes
// the same ciphertext; the tests check the view against it.
const ivUnit = 512

// CheckCompatible says whether this worker can open a volume with layout l
// on a device of deviceSize bytes, and returns the plaintext size. It refuses
// an unsupported cipher or key size, and a device whose size does not give
// the carried payload size (a smaller device loses data; a larger one would
// make dm-crypt's dynamic segment a different size than the source's).
func CheckCompatible(l Layout, deviceSize int64) (int64, error) {
	if err := l.Validate(); err != nil {
		return 0, err
	}
	if err := supportedCipher(l.Cipher, l.KeyBytes); err != nil {
		return 0, err
	}
	payload, err := payloadSize(l, deviceSize)
	if err != nil {
		return 0, err
	}
	if l.PayloadSize > 0 && deviceSize-l.DeviceSize() >= int64(l.SectorSize) {
		return 0, fmt.Errorf("device of %d bytes is larger than the carried layout's %d bytes (data offset %d + payload %d): the plaintext sizes would differ; create the target with exactly %d bytes",
			deviceSize, l.DeviceSize(), l.DataOffset, l.PayloadSize, l.DeviceSize())
	}
	return payload, nil
}

func supportedCipher(spec string, keyBytes int) error {
	if c, mode, iv := cipherParts(spec); c != "aes" || mode != "xts" || iv != "plain64" {
		return fmt.Errorf("cipher %q is not supported: ferry's userspace view implements aes-xts-plain64 only; reformat with the default cipher", spec)
	}
	if keyBytes != 32 && keyBytes != 64 {
		return fmt.Errorf("aes-xts-plain64 with a %d-bit key is not supported (256 or 512 bits)", 8*keyBytes)
	}
	return nil
}

// payloadSize is the plaintext size of layout l on a device of deviceSize.
func payloadSize(l Layout, deviceSize int64) (int64, error) {
	if l.PayloadSize > 0 {
		if deviceSize < l.DeviceSize() {
			return 0, fmt.Errorf("device of %d bytes is smaller than the layout needs (data offset %d + payload %d = %d bytes)",
				deviceSize, l.DataOffset, l.PayloadSize, l.DeviceSize())
		}
		return l.PayloadSize, nil
	}
	p := deviceSize - l.DataOffset
	p -= p % int64(l.SectorSize)
	if p <= 0 {
		return 0, fmt.Errorf("device of %d bytes has no room for data after the %d-byte header", deviceSize, l.DataOffset)
	}
	return p, nil
}

// view is the plaintext of a LUKS2 data segment, encrypted and decrypted in
// userspace. Aligned requests run concurrently; requests that cover part of
// an encryption sector read-modify-write it under an exclusive lock, so two
// of them never lose each other's bytes.
type view struct {
	dev     blockdev.Device
	c       *xtsCipher
	off     int64        // data offset on dev
	size    atomic.Int64 // plaintext size; only grows (GrowView)
	sector  int64
	ivBase  uint64 // the segment's iv_tweak; Layout refuses non-zero ones, so 0
	mu      sync.RWMutex
	closed  bool
	bufPool sync.Pool
	crypts  atomic.Int64 // crypt calls running now
}

// OpenView returns the plaintext view of the data segment described by
// layout on dev, using key. Close closes the view only; dev stays open and
// belongs to the caller. Discarded ranges read back as unspecified data (the
// decryption of whatever the device returns), as with dm-crypt.
func OpenView(dev blockdev.Device, layout Layout, key *VolumeKey) (blockdev.Device, error) {
	return openView(dev, layout, key)
}

func openView(dev blockdev.Device, layout Layout, key *VolumeKey) (*view, error) {
	if err := layout.Validate(); err != nil {
		return nil, err
	}
	if err := supportedCipher(layout.Cipher, layout.KeyBytes); err != nil {
		return nil, err
	}
	if key == nil || key.Len() != layout.KeyBytes {
		n := 0
		if key != nil {
			n = key.Len()
		}
		return nil, fmt.Errorf("volume key is %d bytes, the layout needs %d", n, layout.KeyBytes)
	}
	size, err := payloadSize(layout, dev.Size())
	if err != nil {
		return nil, err
	}
	c, err := newXTS(layout.Cipher, key.Bytes())
	if err != nil {
		return nil, err
	}
	v := &view{dev: dev, c: c, off: layout.DataOffset, sector: int64(layout.SectorSize)}
	v.size.Store(size)
	return v, nil
}

// GrowView makes a view opened by this package serve payload plaintext
// bytes, once its device grew to hold them: a LUKS2 dynamic segment follows
// the device. Requests under way keep the size they started with.
func GrowView(d blockdev.Device, payload int64) error {
	v, ok := d.(*view)
	if !ok {
		return fmt.Errorf("grow: %T is not a LUKS2 view", d)
	}
	switch cur := v.size.Load(); {
	case payload < cur:
		return fmt.Errorf("grow view to %d bytes: it serves %d; a view never shrinks", payload, cur)
	case payload%v.sector != 0:
		return fmt.Errorf("grow view to %d bytes: not a multiple of the %d-byte sector", payload, v.sector)
	case v.off+payload > v.dev.Size():
		return fmt.Errorf("grow view to %d bytes: the device is %d bytes, the segment would end at %d; grow the device first", payload, v.dev.Size(), v.off+payload)
	}
	v.size.Store(payload)
	return nil
}

// OpenCarriedView opens the plaintext view of a volume whose header came
// from another worker: it reads the header on dev, compares it with the
// carried layout and checks its keyslots' cost BEFORE running any KDF, then
// unlocks with passphrase and opens the view at the carried layout. A
// source serving a different or a hostile header is refused without the
// target spending work on it.
func OpenCarriedView(dev blockdev.Device, layout Layout, passphrase []byte) (blockdev.Device, error) {
	h, err := ReadHeader(dev, dev.Size())
	if err != nil {
		return nil, fmt.Errorf("reading the LUKS2 header: %w", err)
	}
	if _, err := h.MatchLayout(layout, dev.Size()); err != nil {
		return nil, err
	}
	vk, err := h.Unlock(dev, passphrase)
	if err != nil {
		return nil, err
	}
	defer vk.Wipe()
	return openView(dev, layout, vk)
}

// OpenHeaderView reads the header on dev, unlocks it with passphrase and
// opens the view with the header's own layout: the one-call path for a
// volume whose header is on the device itself.
func OpenHeaderView(dev blockdev.Device, passphrase []byte) (blockdev.Device, Layout, error) {
	h, err := ReadHeader(dev, dev.Size())
	if err != nil {
		return nil, Layout{}, err
	}
	l, err := h.Layout(dev.Size())
	if err != nil {
		return nil, Layout{}, err
	}
	vk, err := h.Unlock(dev, passphrase)
	if err != nil {
		return nil, Layout{}, err
	}
	defer vk.Wipe()
	v, err := openView(dev, l, vk)
	if err != nil {
		return nil, Layout{}, err
	}
	return v, l, nil
}

func (v *view) Size() int64 { return v.size.Load() }

// checkRange is blockdev.CheckRange written so that huge offsets cannot
// overflow past the check.
func checkRange(off, n, size int64) error {
	if off < 0 || n < 0 || n > size || off > size-n {
		return fmt.Errorf("%w: offset %d length %d size %d", blockdev.ErrOutOfRange, off, n, size)
	}
	return nil
}

// iv is the plain64 IV of the sector starting at plaintext offset pos.
func (v *view) iv(pos int64) uint64 { return v.ivBase + uint64(pos/ivUnit) }

// parallelMin is the request size from which sectors are en/decrypted on
// several cores; below it the goroutine hand-off costs more than it saves.
const parallelMin = 128 << 10

// crypt en- or decrypts src (whole sectors at plaintext offset pos) into
// dst, which is src itself or does not overlap it. A large request is split
// over the cores that other requests leave idle: at depth the requests
// already keep every core busy, and splitting each only adds hand-offs
// (docs/profiles.md: on 2 cores a 128 KiB request in 16 pieces took 39 µs,
// in one 26 µs).
func (v *view) crypt(dst, src []byte, pos int64, encrypt bool) {
	step := uint64(v.sector / ivUnit)
	n := int64(len(src))
	running := v.crypts.Add(1)
	defer v.crypts.Add(-1)
	// The cores, not GOMAXPROCS: the volume server raises GOMAXPROCS far
	// above them for its blocking reads.
	workers := int64(min(runtime.GOMAXPROCS(0), runtime.NumCPU())) / running
	if n < parallelMin || workers < 2 {
		v.c.cryptSectors(dst, src, int(v.sector), v.iv(pos), step, encrypt)
		return
	}
	chunk := (n/workers + v.sector - 1) / v.sector * v.sector
	var wg sync.WaitGroup
	// The first piece on this goroutine: one hand-off fewer.
	for start := chunk; start < n; start += chunk {
		end := min(start+chunk, n)
		wg.Add(1)
		go func() {
			defer wg.Done()
			v.c.cryptSectors(dst[start:end], src[start:end], int(v.sector), v.iv(pos+start), step, encrypt)
		}()
	}
	v.c.cryptSectors(dst[:min(chunk, n)], src[:min(chunk, n)], int(v.sector), v.iv(pos), step, encrypt)
	wg.Wait()
}

func (v *view) getBuf(n int) []byte {
	if b, ok := v.bufPool.Get().(*[]byte); ok && cap(*b) >= n {
		return (*b)[:n]
	}
	return alignedBuf(n)
}

// bufAlign keeps the view's buffers page-aligned, so that a device below
// opened with O_DIRECT can take them as they are.
const bufAlign = 4096

func alignedBuf(n int) []byte {
	b := make([]byte, n+bufAlign)
	off := (bufAlign - int(uintptr(unsafe.Pointer(unsafe.SliceData(b)))%bufAlign)) % bufAlign
	return b[off : off+n : off+n]
}

// putBuf returns b to the pool; plain says it may hold plaintext, which
// must not linger in pooled memory (ciphertext may).
func (v *view) putBuf(b []byte, plain bool) {
	if cap(b) <= 4<<20 {
		if plain {
			clear(b)
		}
		v.bufPool.Put(&b)
	}
}

// span rounds [off, off+n) out to whole sectors.
func (v *view) span(off int64, n int) (start, end int64) {
	start = off - off%v.sector
	end = off + int64(n)
	if r := end % v.sector; r != 0 {
		end += v.sector - r
	}
	return start, end
}

func (v *view) ReadAt(p []byte, off int64) (int, error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if v.closed {
		return 0, blockdev.ErrClosed
	}
	if err := checkRange(off, int64(len(p)), v.size.Load()); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	start, end := v.span(off, len(p))
	if start == off && end == off+int64(len(p)) {
		if err := v.readPlain(p, off); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	buf := v.getBuf(int(end - start))
	defer v.putBuf(buf, true)
	if err := v.readPlain(buf, start); err != nil {
		return 0, err
	}
	copy(p, buf[off-start:])
	return len(p), nil
}

// readPlain reads whole sectors at plaintext offset pos into b and decrypts them.
func (v *view) readPlain(b []byte, pos int64) error {
	if _, err := v.dev.ReadAt(b, v.off+pos); err != nil {
		return fmt.Errorf("luks view: read %d bytes of ciphertext at %d: %w", len(b), v.off+pos, err)
	}
	v.crypt(b, b, pos, false)
	return nil
}

func (v *view) WriteAt(p []byte, off int64) (int, error) {
	start, end := v.span(off, len(p))
	aligned := start == off && end == off+int64(len(p))
	// Partial-sector writes read, patch and rewrite the sector: exclusive,
	// so a concurrent write to the same sector cannot be lost.
	if aligned {
		v.mu.RLock()
		defer v.mu.RUnlock()
	} else {
		v.mu.Lock()
		defer v.mu.Unlock()
	}
	if v.closed {
		return 0, blockdev.ErrClosed
	}
	if err := checkRange(off, int64(len(p)), v.size.Load()); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	// The ciphertext goes to a pooled buffer: p is the caller's and must
	// keep its plaintext. Aligned writes encrypt straight from p into it.
	buf := v.getBuf(int(end - start))
	plain := !aligned // partial sectors are read as plaintext until encrypted
	defer func() { v.putBuf(buf, plain) }()
	if aligned {
		v.crypt(buf, p, start, true)
	} else {
		// Only the first and last sectors are partial; read just those.
		if err := v.readPlain(buf[:v.sector], start); err != nil {
			return 0, err
		}
		if end-start > v.sector {
			last := end - start - v.sector
			if err := v.readPlain(buf[last:], end-v.sector); err != nil {
				return 0, err
			}
		}
		copy(buf[off-start:], p)
		v.crypt(buf, buf, start, true)
		plain = false
	}
	if _, err := v.dev.WriteAt(buf, v.off+start); err != nil {
		return 0, fmt.Errorf("luks view: write %d bytes of ciphertext at %d: %w", len(buf), v.off+start, err)
	}
	return len(p), nil
}

// Discard passes the whole sectors inside [off, off+length) down as a
// discard of their ciphertext; partial sectors at the edges keep their data.
func (v *view) Discard(off, length int64) error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if v.closed {
		return blockdev.ErrClosed
	}
	if err := checkRange(off, length, v.size.Load()); err != nil {
		return fmt.Errorf("discard: %w", err)
	}
	start := (off + v.sector - 1) / v.sector * v.sector
	end := (off + length) / v.sector * v.sector
	if end <= start {
		return nil
	}
	if err := v.dev.Discard(v.off+start, end-start); err != nil {
		return fmt.Errorf("luks view: discard ciphertext %d+%d: %w", v.off+start, end-start, err)
	}
	return nil
}

func (v *view) Flush() error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if v.closed {
		return blockdev.ErrClosed
	}
	if err := v.dev.Flush(); err != nil && !errors.Is(err, blockdev.ErrReadOnly) {
		return fmt.Errorf("luks view: flush: %w", err)
	}
	return nil
}

// Close ends the view; the device below stays open. The expanded AES key
// inside the cipher cannot be zeroed from Go, so it is dropped for the GC.
func (v *view) Close() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.closed = true
	v.c = nil
	return nil
}

// String and GoString keep fmt from walking into the cipher's key schedule.
func (v *view) String() string {
	return fmt.Sprintf("luks view (%d plaintext bytes at offset %d, %d-byte sectors)", v.size.Load(), v.off, v.sector)
}

func (v *view) GoString() string { return v.String() }
