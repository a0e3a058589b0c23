package luks

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"sort"
	"strconv"
	"strings"
)

// On-disk constants of the LUKS2 binary header (LUKS2 on-disk format spec §2).
const (
	binHeaderSize = 4096
	magicLen      = 6
	// MaxMetadataSize is the largest metadata area (binary header + JSON) a
	// LUKS2 header copy may have.
	MaxMetadataSize = 4 << 20
	// maxKeyslotsSize is cryptsetup's LUKS2_MAX_KEYSLOTS_SIZE.
	maxKeyslotsSize = 128 << 20
)

var (
	magicPrimary   = []byte{'L', 'U', 'K', 'S', 0xba, 0xbe}
	magicSecondary = []byte{'S', 'K', 'U', 'L', 0xba, 0xbe}
)

// metadataSizes are the only header sizes cryptsetup writes or accepts; the
// secondary copy sits right after the primary, so these are also the offsets
// where a secondary copy is searched when the primary is unreadable.
var metadataSizes = []int64{16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20}

// Errors a caller can test for with errors.Is.
var (
	// ErrNotLUKS2: neither header copy carries the LUKS2 magic and version.
	ErrNotLUKS2 = errors.New("not a LUKS2 device")
	// ErrCorruptHeader: a header is present but no copy is valid.
	ErrCorruptHeader = errors.New("corrupt LUKS2 header")
)

// Copy names one of the two header copies.
type Copy string

const (
	Primary   Copy = "primary"
	Secondary Copy = "secondary"
)

// Header is a parsed, validated LUKS2 header: the binary fields of the copy
// in use and its JSON metadata.
type Header struct {
	Version      uint16 `json:"version"`
	MetadataSize int64  `json:"metadata_size"` // hdr_size: binary header + JSON area of one copy
	SeqID        uint64 `json:"seqid"`         // "Epoch" in luksDump
	Label        string `json:"label"`
	Subsystem    string `json:"subsystem"`
	ChecksumAlg  string `json:"checksum_alg"`
	UUID         string `json:"uuid"`

	// Used is the copy the header was read from; Damaged lists copies that
	// were unreadable or older, with the reason, so the caller can report them.
	Used    Copy            `json:"used"`
	Damaged map[Copy]string `json:"damaged,omitempty"`

	Meta Metadata `json:"metadata"`
}

// Metadata is the JSON area (spec §3). Numbers that may exceed 2^53 are
// strings on disk; they are parsed into int64 fields after decoding.
type Metadata struct {
	Keyslots map[string]*Keyslot `json:"keyslots"`
	Segments map[string]*Segment `json:"segments"`
	Digests  map[string]*Digest  `json:"digests"`
	Tokens   map[string]any      `json:"tokens"`
	Config   Config              `json:"config"`
}

// Keyslot is one keyslot object.
type Keyslot struct {
	Type     string       `json:"type"`
	KeySize  int          `json:"key_size"`
	AF       AntiForensic `json:"af"`
	Area     Area         `json:"area"`
	KDF      KDF          `json:"kdf"`
	Priority *int         `json:"priority,omitempty"`
}

// AntiForensic describes the AF splitter of a keyslot.
type AntiForensic struct {
	Type    string `json:"type"`
	Stripes int    `json:"stripes"`
	Hash    string `json:"hash"`
}

// Area is where a keyslot's encrypted AF-split key lives.
type Area struct {
	Type       string `json:"type"`
	OffsetStr  string `json:"offset"`
	SizeStr    string `json:"size"`
	Encryption string `json:"encryption"`
	KeySize    int    `json:"key_size"`
	Offset     int64  `json:"-"`
	Size       int64  `json:"-"`
}

// KDF holds the parameters of a keyslot's key derivation.
type KDF struct {
	Type       string `json:"type"`
	Hash       string `json:"hash,omitempty"`       // pbkdf2
	Iterations int    `json:"iterations,omitempty"` // pbkdf2
	Time       int    `json:"time,omitempty"`       // argon2
	Memory     int    `json:"memory,omitempty"`     // argon2, KiB
	CPUs       int    `json:"cpus,omitempty"`       // argon2
	Salt       []byte `json:"salt"`
}

// Segment is one data segment.
type Segment struct {
	Type       string   `json:"type"`
	OffsetStr  string   `json:"offset"`
	SizeStr    string   `json:"size"`
	IVTweakStr string   `json:"iv_tweak"`
	Encryption string   `json:"encryption"`
	SectorSize int      `json:"sector_size"`
	Flags      []string `json:"flags,omitempty"`
	Integrity  any      `json:"integrity,omitempty"`
	Offset     int64    `json:"-"`
	Size       int64    `json:"-"` // 0 = dynamic (to the end of the device)
	IVTweak    uint64   `json:"-"`
}

// Digest verifies a volume key.
type Digest struct {
	Type       string   `json:"type"`
	Keyslots   []string `json:"keyslots"`
	Segments   []string `json:"segments"`
	Hash       string   `json:"hash"`
	Iterations int      `json:"iterations"`
	Salt       []byte   `json:"salt"`
	Digest     []byte   `json:"digest"`
}

// Config is the config object.
type Config struct {
	JSONSizeStr     string   `json:"json_size"`
	KeyslotsSizeStr string   `json:"keyslots_size"`
	Flags           []string `json:"flags,omitempty"`
	Requirements    any      `json:"requirements,omitempty"`
	JSONSize        int64    `json:"-"`
	KeyslotsSize    int64    `json:"-"`
}

// binHeader is one decoded binary header copy.
type binHeader struct {
	version     uint16
	hdrSize     uint64
	seqID       uint64
	label       string
	checksumAlg string
	salt        []byte
	uuid        string
	subsystem   string
	hdrOffset   uint64
	csum        []byte
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func decodeBin(b []byte) binHeader {
	return binHeader{
		version:     binary.BigEndian.Uint16(b[6:8]),
		hdrSize:     binary.BigEndian.Uint64(b[8:16]),
		seqID:       binary.BigEndian.Uint64(b[16:24]),
		label:       cString(b[24:72]),
		checksumAlg: cString(b[72:104]),
		salt:        b[104:168],
		uuid:        cString(b[168:208]),
		subsystem:   cString(b[208:256]),
		hdrOffset:   binary.BigEndian.Uint64(b[256:264]),
		csum:        b[448:512],
	}
}

func checksumHash(alg string) (hash.Hash, error) {
	switch alg {
	case "sha256":
		return sha256.New(), nil
	case "sha512":
		return sha512.New(), nil
	case "sha1":
		return sha1.New(), nil
	}
	return nil, fmt.Errorf("unsupported header checksum algorithm %q", alg)
}

// readCopy reads and verifies one header copy at off. It returns the binary
// header and the JSON bytes (NUL-trimmed).
func readCopy(r io.ReaderAt, size, off int64, magic []byte) (binHeader, []byte, error) {
	if off+binHeaderSize > size {
		return binHeader{}, nil, fmt.Errorf("device of %d bytes is too small for a header at %d: %w", size, off, ErrNotLUKS2)
	}
	b := make([]byte, binHeaderSize)
	if _, err := r.ReadAt(b, off); err != nil {
		return binHeader{}, nil, fmt.Errorf("read binary header at %d: %w", off, err)
	}
	if !bytes.Equal(b[:magicLen], magic) {
		return binHeader{}, nil, fmt.Errorf("bad magic %q at offset %d: %w", b[:magicLen], off, ErrNotLUKS2)
	}
	h := decodeBin(b)
	if h.version != 2 {
		return binHeader{}, nil, fmt.Errorf("header version %d at offset %d (only LUKS2 is supported): %w", h.version, off, ErrNotLUKS2)
	}
	if !validMetadataSize(int64(h.hdrSize)) {
		return binHeader{}, nil, fmt.Errorf("header at %d: metadata size %d is not one of the LUKS2 sizes (16 KiB … 4 MiB): %w", off, h.hdrSize, ErrCorruptHeader)
	}
	if h.hdrOffset != uint64(off) {
		return binHeader{}, nil, fmt.Errorf("header at %d says it is at offset %d: %w", off, h.hdrOffset, ErrCorruptHeader)
	}
	hdrSize := int64(h.hdrSize)
	if off+hdrSize > size {
		return binHeader{}, nil, fmt.Errorf("header at %d with metadata size %d runs past the %d-byte device (truncated?): %w", off, hdrSize, size, ErrCorruptHeader)
	}
	all := make([]byte, hdrSize)
	copy(all, b)
	if _, err := r.ReadAt(all[binHeaderSize:], off+binHeaderSize); err != nil {
		return binHeader{}, nil, fmt.Errorf("read JSON area at %d: %w", off+binHeaderSize, err)
	}
	hh, err := checksumHash(h.checksumAlg)
	if err != nil {
		return binHeader{}, nil, fmt.Errorf("header at %d: %w: %w", off, err, ErrCorruptHeader)
	}
	want := append([]byte(nil), h.csum[:hh.Size()]...)
	clear(all[448:512])
	hh.Write(all)
	if got := hh.Sum(nil); !bytes.Equal(got, want) {
		return binHeader{}, nil, fmt.Errorf("header at %d: %s checksum mismatch (stored %s, computed %s): %w",
			off, h.checksumAlg, hex.EncodeToString(want), hex.EncodeToString(got), ErrCorruptHeader)
	}
	h.salt = append([]byte(nil), h.salt...)
	h.csum = want
	js := all[binHeaderSize:]
	if i := bytes.IndexByte(js, 0); i >= 0 {
		js = js[:i]
	}
	return h, js, nil
}

func validMetadataSize(n int64) bool {
	for _, s := range metadataSizes {
		if n == s {
			return true
		}
	}
	return false
}

type candidate struct {
	copy Copy
	bin  binHeader
	meta Metadata
}

// ReadHeader reads both header copies from a LUKS2 device of the given size,
// verifies their checksums and JSON, and returns the valid copy with the
// higher sequence id, as cryptsetup does. Damaged or stale copies are listed
// in Header.Damaged. It never writes.
func ReadHeader(r io.ReaderAt, size int64) (*Header, error) {
	if size < binHeaderSize {
		return nil, fmt.Errorf("device of %d bytes is smaller than a LUKS2 binary header: %w", size, ErrNotLUKS2)
	}
	damaged := map[Copy]string{}
	var cands []candidate
	var primaryErr error

	pb, pj, err := readCopy(r, size, 0, magicPrimary)
	if err == nil {
		var m Metadata
		if m, err = parseMetadata(pj, pb, size); err == nil {
			cands = append(cands, candidate{Primary, pb, m})
		}
	}
	if err != nil {
		primaryErr = err
		damaged[Primary] = err.Error()
	}

	// The secondary copy sits at the primary's metadata size; when the
	// primary is unusable, search every legal size like cryptsetup does.
	offsets := metadataSizes
	if err == nil {
		offsets = []int64{int64(pb.hdrSize)}
	}
	var secErr error
	for _, off := range offsets {
		sb, sj, err := readCopy(r, size, off, magicSecondary)
		if err == nil {
			var m Metadata
			if m, err = parseMetadata(sj, sb, size); err == nil {
				cands = append(cands, candidate{Secondary, sb, m})
				secErr = nil
				break
			}
		}
		// Keep the most telling error: a copy with the right magic beats "no magic here".
		if secErr == nil || !errors.Is(err, ErrNotLUKS2) {
			secErr = err
		}
	}
	if secErr != nil {
		damaged[Secondary] = secErr.Error()
	}

	if len(cands) == 0 {
		if errors.Is(primaryErr, ErrNotLUKS2) && errors.Is(secErr, ErrNotLUKS2) {
			return nil, fmt.Errorf("no LUKS2 header copy found (primary: %v): %w", primaryErr, ErrNotLUKS2)
		}
		return nil, fmt.Errorf("no valid LUKS2 header copy (primary: %v; secondary: %v): %w", primaryErr, secErr, ErrCorruptHeader)
	}
	best := cands[0]
	if len(cands) == 2 {
		p, s := cands[0], cands[1]
		switch {
		case p.bin.seqID > s.bin.seqID:
			damaged[Secondary] = fmt.Sprintf("stale: seqid %d older than primary's %d", s.bin.seqID, p.bin.seqID)
		case s.bin.seqID > p.bin.seqID:
			best = s
			damaged[Primary] = fmt.Sprintf("stale: seqid %d older than secondary's %d", p.bin.seqID, s.bin.seqID)
		case p.bin.hdrSize != s.bin.hdrSize || p.bin.uuid != s.bin.uuid:
			return nil, fmt.Errorf("header copies share seqid %d but differ (size %d vs %d, uuid %q vs %q): %w",
				p.bin.seqID, p.bin.hdrSize, s.bin.hdrSize, p.bin.uuid, s.bin.uuid, ErrCorruptHeader)
		}
	}
	h := &Header{
		Version:      best.bin.version,
		MetadataSize: int64(best.bin.hdrSize),
		SeqID:        best.bin.seqID,
		Label:        best.bin.label,
		Subsystem:    best.bin.subsystem,
		ChecksumAlg:  best.bin.checksumAlg,
		UUID:         best.bin.uuid,
		Used:         best.copy,
		Meta:         best.meta,
	}
	if len(damaged) > 0 {
		h.Damaged = damaged
	}
	return h, nil
}

func parseU64(field, s string) (int64, error) {
	v, err := strconv.ParseUint(s, 10, 63)
	if err != nil {
		return 0, fmt.Errorf("%s %q is not a non-negative decimal number", field, s)
	}
	return int64(v), nil
}

// parseMetadata decodes and validates the JSON area against the binary
// header and the device size (spec §3 and cryptsetup's LUKS2_hdr_validate).
func parseMetadata(js []byte, bin binHeader, devSize int64) (Metadata, error) {
	fail := func(format string, a ...any) (Metadata, error) {
		return Metadata{}, fmt.Errorf("header at %d: JSON metadata: %s: %w", bin.hdrOffset, fmt.Sprintf(format, a...), ErrCorruptHeader)
	}
	if len(js) == 0 {
		return fail("empty")
	}
	var m Metadata
	dec := json.NewDecoder(bytes.NewReader(js))
	if err := dec.Decode(&m); err != nil {
		return fail("invalid JSON: %v", err)
	}
	if m.Keyslots == nil || m.Segments == nil || m.Digests == nil || m.Config.JSONSizeStr == "" {
		return fail("missing keyslots, segments, digests or config")
	}
	var err error
	if m.Config.JSONSize, err = parseU64("config.json_size", m.Config.JSONSizeStr); err != nil {
		return fail("%v", err)
	}
	if m.Config.KeyslotsSize, err = parseU64("config.keyslots_size", m.Config.KeyslotsSizeStr); err != nil {
		return fail("%v", err)
	}
	hdrSize := int64(bin.hdrSize)
	if m.Config.JSONSize != hdrSize-binHeaderSize {
		return fail("json_size %d does not match metadata size %d - 4096", m.Config.JSONSize, hdrSize)
	}
	if m.Config.KeyslotsSize > maxKeyslotsSize {
		return fail("keyslots_size %d is larger than cryptsetup's limit of %d", m.Config.KeyslotsSize, maxKeyslotsSize)
	}
	if m.Config.KeyslotsSize%4096 != 0 {
		return fail("keyslots_size %d is not a multiple of 4096", m.Config.KeyslotsSize)
	}
	ksStart := 2 * hdrSize
	ksEnd := ksStart + m.Config.KeyslotsSize // both bounded above: cannot overflow
	if ksEnd > devSize {
		return fail("keyslots area [%d, %d) is outside the %d-byte device", ksStart, ksEnd, devSize)
	}
	if len(m.Keyslots) > maxKeyslots {
		return fail("%d keyslots, cryptsetup allows at most %d", len(m.Keyslots), maxKeyslots)
	}

	type area struct {
		name       string
		start, end int64
	}
	var areas []area
	for id, ks := range m.Keyslots {
		if ks == nil {
			return fail("keyslot %s is null", id)
		}
		if n, err := strconv.ParseUint(id, 10, 31); err != nil || n >= maxKeyslots {
			return fail("keyslot id %q is not a number below %d (cryptsetup's keyslot limit)", id, maxKeyslots)
		}
		if ks.Area.Offset, err = parseU64("keyslot "+id+" area.offset", ks.Area.OffsetStr); err != nil {
			return fail("%v", err)
		}
		if ks.Area.Size, err = parseU64("keyslot "+id+" area.size", ks.Area.SizeStr); err != nil {
			return fail("%v", err)
		}
		if ks.KeySize <= 0 || ks.KeySize > 512 || ks.Area.KeySize <= 0 || ks.Area.KeySize > 512 {
			return fail("keyslot %s key sizes %d/%d out of range", id, ks.KeySize, ks.Area.KeySize)
		}
		// Compare sizes, never sums: offset+size of two 63-bit numbers can
		// wrap negative and slip under the upper bound.
		if ks.Area.Offset < ksStart || ks.Area.Offset > ksEnd || ks.Area.Size > ksEnd-ks.Area.Offset || ks.Area.Offset%512 != 0 {
			return fail("keyslot %s area at %d of %d bytes is outside the keyslots area [%d, %d) or unaligned", id, ks.Area.Offset, ks.Area.Size, ksStart, ksEnd)
		}
		a := area{"keyslot " + id, ks.Area.Offset, ks.Area.Offset + ks.Area.Size}
		if ks.Type == "luks2" {
			if ks.AF.Stripes <= 0 || ks.AF.Stripes > 1<<20 {
				return fail("keyslot %s has %d AF stripes", id, ks.AF.Stripes)
			}
			if int64(ks.KeySize)*int64(ks.AF.Stripes) > ks.Area.Size {
				return fail("keyslot %s: %d-byte key × %d stripes does not fit its %d-byte area", id, ks.KeySize, ks.AF.Stripes, ks.Area.Size)
			}
			if err := checkKDFLimits(ks.KDF); err != nil {
				return fail("keyslot %s: %v", id, err)
			}
		}
		areas = append(areas, a)
	}
	if len(m.Segments) == 0 {
		return fail("no segments")
	}
	for id, s := range m.Segments {
		if s == nil {
			return fail("segment %s is null", id)
		}
		if _, err := strconv.ParseUint(id, 10, 31); err != nil {
			return fail("segment id %q is not a number", id)
		}
		if s.Offset, err = parseU64("segment "+id+" offset", s.OffsetStr); err != nil {
			return fail("%v", err)
		}
		if s.SizeStr != "dynamic" {
			if s.Size, err = parseU64("segment "+id+" size", s.SizeStr); err != nil {
				return fail("%v", err)
			}
		}
		if s.Type == "crypt" {
			if s.IVTweakStr == "" {
				s.IVTweakStr = "0"
			}
			tw, err := strconv.ParseUint(s.IVTweakStr, 10, 64)
			if err != nil {
				return fail("segment %s iv_tweak %q is not a number", id, s.IVTweakStr)
			}
			s.IVTweak = tw
			if s.SectorSize != 512 && s.SectorSize != 1024 && s.SectorSize != 2048 && s.SectorSize != 4096 {
				return fail("segment %s sector_size %d is not 512, 1024, 2048 or 4096", id, s.SectorSize)
			}
			if s.Offset%int64(s.SectorSize) != 0 || s.Size%int64(s.SectorSize) != 0 {
				return fail("segment %s offset %d or size %d is not a multiple of its sector size %d", id, s.Offset, s.Size, s.SectorSize)
			}
		}
		if s.Offset < ksEnd && s.Offset != 0 {
			return fail("segment %s starts at %d, inside the header and keyslots area (ends at %d)", id, s.Offset, ksEnd)
		}
		// As for keyslot areas: compare the size with the room left, so a
		// huge size cannot wrap offset+size below the device size.
		if s.Offset > devSize || s.Size > devSize-s.Offset {
			return fail("segment %s at %d of %d bytes is outside the %d-byte device", id, s.Offset, s.Size, devSize)
		}
	}
	sort.Slice(areas, func(i, j int) bool { return areas[i].start < areas[j].start })
	for i := 1; i < len(areas); i++ {
		if areas[i].start < areas[i-1].end {
			return fail("%s [%d, %d) overlaps %s [%d, %d)", areas[i].name, areas[i].start, areas[i].end,
				areas[i-1].name, areas[i-1].start, areas[i-1].end)
		}
	}
	for id, d := range m.Digests {
		if d == nil {
			return fail("digest %s is null", id)
		}
		if d.Type == "pbkdf2" && (d.Iterations < minPBKDF2Iter || d.Iterations > maxCryptsetupIter) {
			return fail("digest %s: pbkdf2 iterations %d outside cryptsetup's range [%d, %d]", id, d.Iterations, minPBKDF2Iter, maxCryptsetupIter)
		}
		for _, k := range d.Keyslots {
			if m.Keyslots[k] == nil {
				return fail("digest %s refers to missing keyslot %s", id, k)
			}
		}
		for _, s := range d.Segments {
			if m.Segments[s] == nil {
				return fail("digest %s refers to missing segment %s", id, s)
			}
		}
	}
	return m, nil
}

// DataSegment returns the id and segment ferry opens: the crypt segment with
// the lowest id. Headers in the middle of an online reencryption (more than
// one segment) are refused, since their layout is not a single mapping.
func (h *Header) DataSegment() (string, *Segment, error) {
	if len(h.Meta.Segments) != 1 {
		return "", nil, fmt.Errorf("header has %d segments (reencryption in progress?); ferry opens only single-segment volumes: finish it with cryptsetup reencrypt first", len(h.Meta.Segments))
	}
	for id, s := range h.Meta.Segments {
		if s.Type != "crypt" {
			return "", nil, fmt.Errorf("segment %s has type %q, not crypt", id, s.Type)
		}
		return id, s, nil
	}
	panic("unreachable")
}

// VolumeKeyBytes is the volume key size of the data segment, from the
// keyslots bound to it through a digest.
func (h *Header) VolumeKeyBytes() (int, error) {
	segID, _, err := h.DataSegment()
	if err != nil {
		return 0, err
	}
	for _, d := range sortedDigests(h.Meta.Digests) {
		if !contains(d.Segments, segID) {
			continue
		}
		for _, k := range d.Keyslots {
			if ks := h.Meta.Keyslots[k]; ks != nil {
				return ks.KeySize, nil
			}
		}
	}
	return 0, fmt.Errorf("no keyslot is bound to data segment %s: the volume cannot be unlocked", segID)
}

// Layout is the record the target needs to open this volume. deviceSize
// gives the payload size of a dynamic segment; pass 0 when unknown.
func (h *Header) Layout(deviceSize int64) (Layout, error) {
	_, seg, err := h.DataSegment()
	if err != nil {
		return Layout{}, err
	}
	if seg.IVTweak != 0 {
		return Layout{}, fmt.Errorf("data segment has iv_tweak %d (left over from a reencryption?); ferry supports iv_tweak 0 only", seg.IVTweak)
	}
	kb, err := h.VolumeKeyBytes()
	if err != nil {
		return Layout{}, err
	}
	l := Layout{
		UUID:         h.UUID,
		DataOffset:   seg.Offset,
		MetadataSize: h.MetadataSize,
		KeyslotsSize: h.Meta.Config.KeyslotsSize,
		SectorSize:   seg.SectorSize,
		Cipher:       seg.Encryption,
		KeyBytes:     kb,
		PayloadSize:  seg.Size,
	}
	if seg.Size == 0 && deviceSize > 0 {
		if deviceSize < seg.Offset {
			return Layout{}, fmt.Errorf("device of %d bytes ends before the data offset %d", deviceSize, seg.Offset)
		}
		p := deviceSize - seg.Offset
		l.PayloadSize = p - p%int64(seg.SectorSize)
	}
	if err := l.Validate(); err != nil {
		return Layout{}, err
	}
	return l, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func sortedIDs[T any](m map[string]T) []string {
	ids := make([]string, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool {
		a, _ := strconv.Atoi(ids[i])
		b, _ := strconv.Atoi(ids[j])
		return a < b
	})
	return ids
}

func sortedDigests(m map[string]*Digest) []*Digest {
	var out []*Digest
	for _, id := range sortedIDs(m) {
		out = append(out, m[id])
	}
	return out
}

// cipherParts splits "aes-xts-plain64" into cipher "aes", mode "xts", iv "plain64".
func cipherParts(spec string) (cipher, mode, iv string) {
	parts := strings.SplitN(spec, "-", 3)
	for len(parts) < 3 {
		parts = append(parts, "")
	}
	return parts[0], parts[1], parts[2]
}
