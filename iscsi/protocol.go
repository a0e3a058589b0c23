package iscsi

import (
	"encoding/binary"

	"github.com/gostor/gotgt/pkg/api"
	"github.com/gostor/gotgt/pkg/scsi"
)

// roProtocol wraps gotgt's SBC command table for a read-only LU. It does not
// change gotgt; it composes around it:
//   - every command that could modify the medium answers CHECK CONDITION,
//     DATA PROTECT / WRITE PROTECTED, before gotgt's own handler runs (which
//     for ORWRITE(16) would panic, and for UNMAP / WRITE SAME do nothing);
//   - PRE-FETCH, a hint that reads nothing out, is accepted within the LU
//     (gotgt refuses it as a write on a read-only LU);
//   - INQUIRY VPD pages are cut to their page length: gotgt returns the whole
//     allocation length, which initiators (libiscsi) rightly reject.
type roProtocol struct {
	api.SCSIDeviceProtocol
}

// modifying lists the opcodes refused on a read-only LU.
var modifying = map[api.SCSICommandType]bool{
	api.FORMAT_UNIT: true, api.WRITE_6: true, api.WRITE_10: true, api.WRITE_12: true, api.WRITE_16: true,
	api.WRITE_VERIFY: true, api.WRITE_VERIFY_12: true, api.WRITE_VERIFY_16: true,
	api.WRITE_SAME: true, api.WRITE_SAME_16: true, api.UNMAP: true, api.ORWRITE_16: true,
	api.COMPARE_AND_WRITE: true, api.WRITE_LONG: true, api.WRITE_LONG_2: true,
}

func (p roProtocol) PerformCommand(opcode int) interface{} {
	inner := p.SCSIDeviceProtocol.PerformCommand(opcode)
	op, ok := inner.(scsi.SCSIDeviceOperation)
	if !ok {
		return inner
	}
	switch {
	case modifying[api.SCSICommandType(opcode)]:
		op.CommandPerformFunc = writeProtected
	case api.SCSICommandType(opcode) == api.PRE_FETCH_10 || api.SCSICommandType(opcode) == api.PRE_FETCH_16:
		op.CommandPerformFunc = prefetch
	case api.SCSICommandType(opcode) == api.INQUIRY:
		op.CommandPerformFunc = inquiryExactLength(op.CommandPerformFunc)
	}
	return op
}

func writeProtected(_ int, cmd *api.SCSICommand) api.SAMStat {
	scsi.BuildSenseData(cmd, scsi.DATA_PROTECT, scsi.ASC_WRITE_PROTECT)
	return api.SAMStatCheckCondition
}

func inquiryExactLength(next api.CommandFunc) api.CommandFunc {
	return func(host int, cmd *api.SCSICommand) api.SAMStat {
		st := next(host, cmd)
		scb, in := cmd.SCB, cmd.InSDBBuffer
		if st != api.SAMStatGood || len(scb) < 5 || scb[1]&0x01 == 0 || in == nil || in.Resid != 0 || len(in.Buffer) < 4 {
			return st
		}
		n := uint32(binary.BigEndian.Uint16(in.Buffer[2:4])) + 4
		if alloc := uint32(binary.BigEndian.Uint16(scb[3:5])); alloc < n {
			n = alloc
		}
		if n < in.Length {
			in.Resid = n // gotgt sends Resid bytes when it is set
		}
		return st
	}
}

// prefetch checks the range and answers GOOD: the page cache does the rest.
func prefetch(_ int, cmd *api.SCSICommand) api.SAMStat {
	scb := cmd.SCB
	var lba, n uint64
	switch {
	case scb[0] == byte(api.PRE_FETCH_10) && len(scb) >= 10:
		lba, n = uint64(binary.BigEndian.Uint32(scb[2:6])), uint64(binary.BigEndian.Uint16(scb[7:9]))
	case scb[0] == byte(api.PRE_FETCH_16) && len(scb) >= 16:
		lba, n = binary.BigEndian.Uint64(scb[2:10]), uint64(binary.BigEndian.Uint32(scb[10:14]))
	default:
		scsi.BuildSenseData(cmd, scsi.ILLEGAL_REQUEST, scsi.ASC_INVALID_FIELD_IN_CDB)
		return api.SAMStatCheckCondition
	}
	blocks := cmd.Device.Size >> cmd.Device.BlockShift
	if lba > blocks || n > blocks-lba {
		scsi.BuildSenseData(cmd, scsi.ILLEGAL_REQUEST, scsi.ASC_LBA_OUT_OF_RANGE)
		return api.SAMStatCheckCondition
	}
	return api.SAMStatGood
}
