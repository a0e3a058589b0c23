package fsm

import "fmt"

// The replicated log and snapshots hold only types this package defines, so
// their encoding changes only when fsm does (and its format version with it).
// Callers convert at the boundary: LUKSLayout has luks.Layout's fields, Range
// has blockdev.Range's, so a plain Go conversion works both ways and stops
// compiling if either side changes shape.

// LUKSLayout is the LUKS2 header geometry a migration carries from the source
// to the target: the target sizes and opens the destination from it, never
// from local defaults.
type LUKSLayout struct {
	UUID         string `json:"uuid"`
	DataOffset   int64  `json:"data_offset"`   // bytes from the device start to the first ciphertext sector
	MetadataSize int64  `json:"metadata_size"` // one binary header + JSON area, bytes
	KeyslotsSize int64  `json:"keyslots_size"` // bytes
	SectorSize   int    `json:"sector_size"`   // encryption sector size of the data segment, bytes
	Cipher       string `json:"cipher"`        // e.g. aes-xts-plain64
	KeyBytes     int    `json:"key_bytes"`     // volume key size, bytes
	PayloadSize  int64  `json:"payload_size"`  // plaintext bytes; 0 only while the device size is unknown
}

// Validate checks what the store accepts. These are the store's own rules
// (the same as the luks package's today): what Apply accepts must not change
// when a library does, or replicas replaying one log would disagree.
func (l LUKSLayout) Validate() error {
	switch {
	case l.DataOffset <= 0 || l.DataOffset%512 != 0:
		return fmt.Errorf("luks layout: data offset %d is not a positive multiple of 512", l.DataOffset)
	case l.SectorSize != 512 && l.SectorSize != 1024 && l.SectorSize != 2048 && l.SectorSize != 4096:
		return fmt.Errorf("luks layout: sector size %d is not 512, 1024, 2048 or 4096", l.SectorSize)
	case l.PayloadSize < 0 || l.PayloadSize%int64(l.SectorSize) != 0:
		return fmt.Errorf("luks layout: payload size %d is not a multiple of sector size %d", l.PayloadSize, l.SectorSize)
	case l.Cipher == "":
		return fmt.Errorf("luks layout: cipher is empty")
	case l.KeyBytes <= 0:
		return fmt.Errorf("luks layout: key size %d bytes is not positive", l.KeyBytes)
	}
	return nil
}

// DeviceSize is the size of the whole encrypted device (header + payload).
func (l LUKSLayout) DeviceSize() int64 { return l.DataOffset + l.PayloadSize }

// Range is a byte range of a volume (known-zero ranges of the source).
type Range struct {
	Off int64 `json:"off"`
	Len int64 `json:"len"`
}

// End returns the first byte after the range.
func (r Range) End() int64 { return r.Off + r.Len }
