// Package nbdexport serves a blockdev.Device to the kernel as a block device,
// /dev/nbdN, over the NBD transmission protocol. It is the userspace data
// path's way to hand its clone to kernel layers above it (dm-crypt, ext4)
// where the kernel has NBD: one kernel block device instead of the FUSE
// file and the loop device over it, so no request crosses the FUSE queue.
//
// Only the transmission phase is spoken: ferry is both ends of an AF_UNIX
// socket pair, and the kernel is configured by ioctl, so there is no
// handshake. The kernel side is trusted no more than a peer: every request
// is checked (magic, type, range, length) before it touches the device; a
// request that cannot be answered ends the connection.
package nbdexport

import (
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"

	"github.com/ferry-dev/ferry/blockdev"
)

// Wire constants of the NBD protocol (NetworkBlockDevice doc/proto.md).
const (
	requestMagic = 0x25609513
	replyMagic   = 0x67446698

	requestLen = 28
	replyLen   = 16

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6

	cmdFlagFUA = 1 << 0

	flagHasFlags        = 1 << 0
	flagReadOnly        = 1 << 1
	flagSendFlush       = 1 << 2
	flagSendFUA         = 1 << 3
	flagSendTrim        = 1 << 5
	flagSendWriteZeroes = 1 << 6
	flagCanMultiConn    = 1 << 8
)

// MaxRequest bounds the bytes one read or write may move. The kernel sends
// at most its max_hw_sectors (32 MiB for NBD); a larger length is hostile or
// a bug, and reading its payload would let the peer make us allocate it.
const MaxRequest = 32 << 20

// Request is one parsed NBD request header.
type Request struct {
	Flags  uint16
	Type   uint16
	Cookie uint64
	Offset uint64
	Length uint32
}

// ErrProtocol marks a request the connection cannot survive: the stream is
// no longer framed (bad magic) or a payload is too large to skip.
var ErrProtocol = errors.New("nbd protocol violation")

// ParseRequest decodes a 28-byte request header. It fails only on what
// breaks the framing; whether the request is valid for a device is Check's.
func ParseRequest(b []byte) (Request, error) {
	if len(b) != requestLen {
		return Request{}, fmt.Errorf("%w: request header of %d bytes, want %d", ErrProtocol, len(b), requestLen)
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != requestMagic {
		return Request{}, fmt.Errorf("%w: request magic %#x, want %#x", ErrProtocol, m, requestMagic)
	}
	r := Request{
		Flags:  binary.BigEndian.Uint16(b[4:6]),
		Type:   binary.BigEndian.Uint16(b[6:8]),
		Cookie: binary.BigEndian.Uint64(b[8:16]),
		Offset: binary.BigEndian.Uint64(b[16:24]),
		Length: binary.BigEndian.Uint32(b[24:28]),
	}
	if r.Type == cmdWrite && r.Length > MaxRequest {
		// Its payload follows the header: neither reading nor skipping
		// MaxRequest+ bytes from a peer is acceptable.
		return r, fmt.Errorf("%w: write of %d bytes, at most %d", ErrProtocol, r.Length, MaxRequest)
	}
	return r, nil
}

// Marshal encodes r (the client side: tests and fuzzing).
func (r Request) Marshal() []byte {
	b := make([]byte, requestLen)
	binary.BigEndian.PutUint32(b[0:4], requestMagic)
	binary.BigEndian.PutUint16(b[4:6], r.Flags)
	binary.BigEndian.PutUint16(b[6:8], r.Type)
	binary.BigEndian.PutUint64(b[8:16], r.Cookie)
	binary.BigEndian.PutUint64(b[16:24], r.Offset)
	binary.BigEndian.PutUint32(b[24:28], r.Length)
	return b
}

// Check returns the errno the request is answered with without touching a
// device of size bytes (0 when it may be served).
func (r Request) Check(size int64, readOnly bool) syscall.Errno {
	switch r.Type {
	case cmdRead, cmdWrite, cmdTrim, cmdWriteZeroes:
	case cmdFlush:
		return 0
	default:
		return syscall.EINVAL
	}
	// Reads and writes move their bytes through a buffer; a trim or
	// write-zeroes only names a range, which the kernel makes as large as
	// fstrim asks (gigabytes).
	if (r.Type == cmdRead || r.Type == cmdWrite) && r.Length > MaxRequest {
		return syscall.EINVAL
	}
	if r.Offset > uint64(size) || uint64(r.Length) > uint64(size)-r.Offset {
		return syscall.EINVAL
	}
	if readOnly && r.Type != cmdRead {
		return syscall.EPERM
	}
	return 0
}

// reply encodes a simple reply header (the kernel takes no structured ones).
func reply(b []byte, cookie uint64, errno syscall.Errno) []byte {
	b = b[:replyLen]
	binary.BigEndian.PutUint32(b[0:4], replyMagic)
	binary.BigEndian.PutUint32(b[4:8], uint32(errno))
	binary.BigEndian.PutUint64(b[8:16], cookie)
	return b
}

// errnoOf maps a device error to the errno the kernel passes up.
func errnoOf(err error) syscall.Errno {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, blockdev.ErrOutOfRange):
		return syscall.EINVAL
	case errors.Is(err, blockdev.ErrReadOnly):
		return syscall.EPERM
	case errors.Is(err, blockdev.ErrClosed):
		return syscall.ESHUTDOWN
	}
	return syscall.EIO
}

// TransmissionFlags are the flags the kernel is configured with for a
// device: flush, FUA, trim and write-zeroes are all passed on, and several
// connections may serve it (every reply follows its request's completion
// on the device, so a flush on any connection covers writes replied on all).
func TransmissionFlags(readOnly bool) uint16 {
	f := uint16(flagHasFlags | flagSendFlush | flagSendFUA | flagSendTrim | flagSendWriteZeroes | flagCanMultiConn)
	if readOnly {
		f |= flagReadOnly
	}
	return f
}
