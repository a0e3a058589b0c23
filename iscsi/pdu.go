package iscsi

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// iSCSI opcodes (RFC 7143 §11.2.1.2) that ferry's initiator sends or handles.
const (
	opNOPOut      = 0x00
	opSCSICmd     = 0x01
	opLoginReq    = 0x03
	opTextReq     = 0x04
	opLogoutReq   = 0x06
	opNOPIn       = 0x20
	opSCSIResp    = 0x21
	opLoginResp   = 0x23
	opTextResp    = 0x24
	opDataIn      = 0x25
	opLogoutResp  = 0x26
	opR2T         = 0x31
	opAsyncMsg    = 0x32
	opReject      = 0x3f
	flagImmediate = 0x40
	flagFinal     = 0x80

	bhsLen      = 48
	reservedTag = 0xffffffff
	// maxDataSegment bounds what the parser accepts from a peer, whatever the
	// header claims, so a hostile length cannot make us allocate gigabytes.
	maxDataSegment = 16 << 20
)

// ErrProtocol marks a PDU that breaks RFC 7143; the connection is dropped.
var ErrProtocol = errors.New("iSCSI protocol error")

// pdu is one iSCSI PDU: its 48-byte basic header segment plus data segment.
// AHS and digests are never negotiated, so they are read and discarded.
type pdu struct {
	bhs  [bhsLen]byte
	data []byte
}

func (p *pdu) opcode() byte      { return p.bhs[0] & 0x3f }
func (p *pdu) flags() byte       { return p.bhs[1] }
func (p *pdu) itt() uint32       { return binary.BigEndian.Uint32(p.bhs[16:20]) }
func (p *pdu) ttt() uint32       { return binary.BigEndian.Uint32(p.bhs[20:24]) }
func (p *pdu) statSN() uint32    { return binary.BigEndian.Uint32(p.bhs[24:28]) }
func (p *pdu) expCmdSN() uint32  { return binary.BigEndian.Uint32(p.bhs[28:32]) }
func (p *pdu) maxCmdSN() uint32  { return binary.BigEndian.Uint32(p.bhs[32:36]) }
func (p *pdu) dataLen() int      { return int(p.bhs[5])<<16 | int(p.bhs[6])<<8 | int(p.bhs[7]) }
func (p *pdu) ahsLen() int       { return int(p.bhs[4]) * 4 }
func (p *pdu) bufferOffset() int { return int(binary.BigEndian.Uint32(p.bhs[40:44])) }

func (p *pdu) setDataLen(n int) {
	p.bhs[5], p.bhs[6], p.bhs[7] = byte(n>>16), byte(n>>8), byte(n)
}

func put32(b []byte, v uint32) { binary.BigEndian.PutUint32(b, v) }

// pad4 rounds a data segment length up to the 4-byte boundary the wire uses.
func pad4(n int) int { return (n + 3) &^ 3 }

// header reads one BHS and skips its AHS. It validates the data length
// against limit so the caller can read the segment where it wants it.
func readHeader(r io.Reader, p *pdu, limit int) error {
	if _, err := io.ReadFull(r, p.bhs[:]); err != nil {
		return err
	}
	if n := p.ahsLen(); n > 0 {
		if _, err := io.CopyN(io.Discard, r, int64(n)); err != nil {
			return err
		}
	}
	if p.dataLen() > limit {
		return fmt.Errorf("%w: opcode %#x carries a %d-byte data segment, more than the %d negotiated",
			ErrProtocol, p.opcode(), p.dataLen(), limit)
	}
	return nil
}

// readPDU reads a whole PDU (header and data, padding dropped).
func readPDU(r io.Reader, limit int) (*pdu, error) {
	p := new(pdu)
	if err := readHeader(r, p, limit); err != nil {
		return nil, err
	}
	if n := p.dataLen(); n > 0 {
		p.data = make([]byte, pad4(n))
		if _, err := io.ReadFull(r, p.data); err != nil {
			return nil, err
		}
		p.data = p.data[:n]
	}
	return p, nil
}

// marshal encodes p with its padded data segment.
func (p *pdu) marshal() []byte {
	p.setDataLen(len(p.data))
	b := make([]byte, bhsLen+pad4(len(p.data)))
	copy(b, p.bhs[:])
	copy(b[bhsLen:], p.data)
	return b
}

// parseText decodes key=value pairs separated by NUL (RFC 7143 §6.1).
func parseText(data []byte) (map[string]string, error) {
	kv := make(map[string]string)
	for _, item := range strings.Split(string(data), "\x00") {
		if item == "" {
			continue
		}
		k, v, ok := strings.Cut(item, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("%w: text key without value: %q", ErrProtocol, truncate(item, 64))
		}
		kv[k] = v
	}
	return kv, nil
}

func encodeText(pairs [][2]string) []byte {
	var b strings.Builder
	for _, kv := range pairs {
		b.WriteString(kv[0])
		b.WriteByte('=')
		b.WriteString(kv[1])
		b.WriteByte(0)
	}
	return []byte(b.String())
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// snLess compares sequence numbers in serial arithmetic (RFC 1982, 32 bits).
func snLess(a, b uint32) bool { return a != b && int32(a-b) < 0 }

// encodeLUN builds the 8-byte LUN field: peripheral addressing below 256,
// flat space addressing up to 16383 (SAM-5 §4.7).
func encodeLUN(lun uint64) [8]byte {
	var b [8]byte
	if lun < 256 {
		b[1] = byte(lun)
	} else {
		b[0] = 0x40 | byte(lun>>8)&0x3f
		b[1] = byte(lun)
	}
	return b
}
