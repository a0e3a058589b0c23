// Package luks reads LUKS2 headers, carries their layout between workers and
// opens the plaintext view of a volume.
package luks

import (
	"fmt"
	"math"
)

// Layout is the part of a LUKS2 header the target must honour to open the
// source's volume: it travels in the migration record, because two workers
// with different cryptsetup defaults disagree on the data offset (4 MiB vs
// 16 MiB headers) and so on the plaintext size of the same volume.
type Layout struct {
	UUID         string `json:"uuid"`
	DataOffset   int64  `json:"data_offset"`   // bytes from the device start to the first ciphertext sector
	MetadataSize int64  `json:"metadata_size"` // one binary header + JSON area, bytes (16 KiB … 4 MiB)
	KeyslotsSize int64  `json:"keyslots_size"` // bytes
	SectorSize   int    `json:"sector_size"`   // encryption sector size of the data segment, bytes
	Cipher       string `json:"cipher"`        // e.g. aes-xts-plain64
	KeyBytes     int    `json:"key_bytes"`     // volume key size, bytes (64 for aes-xts 512-bit)
	PayloadSize  int64  `json:"payload_size"`  // plaintext bytes; 0 only while the device size is unknown
}

// Validate checks the layout is internally consistent.
func (l Layout) Validate() error {
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
	case l.PayloadSize > math.MaxInt64-l.DataOffset:
		// The layout travels in the migration record: a source could write
		// sizes whose sum wraps negative and slips under every size check.
		return fmt.Errorf("luks layout: data offset %d + payload size %d overflows", l.DataOffset, l.PayloadSize)
	case l.MetadataSize < 0 || l.KeyslotsSize < 0:
		return fmt.Errorf("luks layout: metadata size %d or keyslots size %d is negative", l.MetadataSize, l.KeyslotsSize)
	}
	return nil
}

// DeviceSize is the size of the whole encrypted device (header + payload).
func (l Layout) DeviceSize() int64 { return l.DataOffset + l.PayloadSize }
