package iscsi

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// SCSI status and sense keys ferry looks at.
const (
	statusGood           = 0x00
	statusCheckCondition = 0x02
	statusBusy           = 0x08
	statusTaskSetFull    = 0x28

	senseUnitAttention = 0x06
	senseDataProtect   = 0x07
)

// SCSIError is a command that completed with a non-GOOD status.
type SCSIError struct {
	Op     string
	Status byte
	Key    byte // sense key, when sense data came back
	ASC    byte
	ASCQ   byte
}

func (e *SCSIError) Error() string {
	if e.Status == statusCheckCondition {
		return fmt.Sprintf("%s: check condition, sense key %#x (%s) asc/ascq %#02x/%#02x",
			e.Op, e.Key, senseKeyName(e.Key), e.ASC, e.ASCQ)
	}
	return fmt.Sprintf("%s: SCSI status %#02x", e.Op, e.Status)
}

// retryable says whether re-issuing the same command may succeed: a unit
// attention after (re)login, or a busy target.
func (e *SCSIError) retryable() bool {
	return e.Status == statusBusy || e.Status == statusTaskSetFull ||
		(e.Status == statusCheckCondition && e.Key == senseUnitAttention)
}

// IsWriteProtected reports whether err is the DATA PROTECT / WRITE PROTECTED
// check condition a read-only LUN answers writes with.
func IsWriteProtected(err error) bool {
	var se *SCSIError
	return errors.As(err, &se) && se.Key == senseDataProtect
}

func senseKeyName(k byte) string {
	names := [...]string{"no sense", "recovered error", "not ready", "medium error", "hardware error",
		"illegal request", "unit attention", "data protect", "blank check", "vendor specific",
		"copy aborted", "aborted command", "reserved", "volume overflow", "miscompare", "completed"}
	return names[k&0x0f]
}

// parseSense decodes the data segment of a SCSI Response: a 2-byte length
// then fixed (0x70/0x71) or descriptor (0x72/0x73) format sense data.
func parseSense(e *SCSIError, seg []byte) {
	if len(seg) < 2 {
		return
	}
	n := int(binary.BigEndian.Uint16(seg))
	s := seg[2:]
	if n < len(s) {
		s = s[:n]
	}
	if len(s) < 1 {
		return
	}
	switch s[0] & 0x7f {
	case 0x70, 0x71:
		if len(s) >= 3 {
			e.Key = s[2] & 0x0f
		}
		if len(s) >= 14 {
			e.ASC, e.ASCQ = s[12], s[13]
		}
	case 0x72, 0x73:
		if len(s) >= 4 {
			e.Key, e.ASC, e.ASCQ = s[1]&0x0f, s[2], s[3]
		}
	}
}

func cdbRead16(lba uint64, blocks uint32) [16]byte {
	var c [16]byte
	c[0] = 0x88
	binary.BigEndian.PutUint64(c[2:10], lba)
	binary.BigEndian.PutUint32(c[10:14], blocks)
	return c
}

func cdbWrite16(lba uint64, blocks uint32) [16]byte {
	c := cdbRead16(lba, blocks)
	c[0] = 0x8a
	return c
}

func cdbReadCapacity16(alloc uint32) [16]byte {
	var c [16]byte
	c[0] = 0x9e
	c[1] = 0x10 // service action READ CAPACITY (16)
	binary.BigEndian.PutUint32(c[10:14], alloc)
	return c
}

func cdbTestUnitReady() [16]byte { return [16]byte{} }

// capacity is what READ CAPACITY(16) tells: last LBA and block length.
type capacity struct {
	blocks    uint64
	blockSize uint32
}

func parseCapacity16(b []byte) (capacity, error) {
	if len(b) < 12 {
		return capacity{}, fmt.Errorf("%w: READ CAPACITY(16) returned %d bytes", ErrProtocol, len(b))
	}
	c := capacity{blocks: binary.BigEndian.Uint64(b[0:8]) + 1, blockSize: binary.BigEndian.Uint32(b[8:12])}
	if c.blockSize == 0 || c.blockSize&(c.blockSize-1) != 0 || c.blockSize > 1<<20 || c.blocks == 0 || c.blocks > 1<<48 ||
		c.blocks > math.MaxInt64/uint64(c.blockSize) {
		return capacity{}, fmt.Errorf("%w: READ CAPACITY(16) reports %d blocks of %d bytes", ErrProtocol, c.blocks, c.blockSize)
	}
	return c, nil
}
