// Package blockdev defines the block device every layer of ferry's userspace
// data path implements and composes: iSCSI LUN -> clone engine -> LUKS view ->
// FUSE export. It is io.ReaderAt/io.WriterAt plus the few block operations a
// filesystem needs (size, discard, flush).
package blockdev

import (
	"errors"
	"fmt"
	"io"
)

// Device is a fixed-size random-access block device.
//
// ReadAt and WriteAt follow io.ReaderAt/io.WriterAt; a request that crosses
// Size() fails with ErrOutOfRange and transfers nothing. Discard tells the
// device a range's contents are no longer needed (it then reads as zeros on
// devices that punch holes, or is left unspecified). Flush makes every
// completed write durable.
type Device interface {
	io.ReaderAt
	io.WriterAt
	Size() int64
	Discard(off, length int64) error
	Flush() error
	Close() error
}

var (
	// ErrReadOnly is returned by writes and discards on a read-only device.
	ErrReadOnly = errors.New("device is read-only")
	// ErrOutOfRange is returned for a request past the end of the device.
	ErrOutOfRange = errors.New("request outside the device")
	// ErrClosed is returned by any call after Close.
	ErrClosed = errors.New("device is closed")
)

// Range is a byte range [Off, Off+Len).
type Range struct {
	Off int64 `json:"off"`
	Len int64 `json:"len"`
}

// End returns the first byte after the range.
func (r Range) End() int64 { return r.Off + r.Len }

// CheckRange validates a request of n bytes at off against a device of size.
func CheckRange(off int64, n int, size int64) error {
	// Written so that a huge offset cannot overflow into a valid range.
	if off < 0 || n < 0 || off > size || int64(n) > size-off {
		return fmt.Errorf("%w: offset %d length %d size %d", ErrOutOfRange, off, n, size)
	}
	return nil
}

// ReadOnly wraps a device so that every write and discard fails with ErrReadOnly.
func ReadOnly(d Device) Device { return readOnly{d} }

type readOnly struct{ Device }

func (r readOnly) WriteAt([]byte, int64) (int, error) { return 0, ErrReadOnly }
func (r readOnly) Discard(int64, int64) error         { return ErrReadOnly }
