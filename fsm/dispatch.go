package fsm

import "reflect"

// commandRow is what this build does with one command type: the payload
// Decode fills, the check Authorize makes after Validate (nil: none), and
// the change Apply makes. One row per type keeps the three in step: a type
// cannot be decoded without being authorized and applied.
type commandRow struct {
	payload   func() any
	authorize func(s *Store, p any) *Refusal
	apply     func(s *Store, index uint64, p any) *Result
}

// commands holds a row for every type in CommandTypes (a test checks).
var commands = map[CommandType]commandRow{
	CmdRegisterServer: row((*Store).authorizeRegisterServer, (*Store).applyRegisterServer),
	CmdRegisterWorker: row((*Store).authorizeRegisterWorker, (*Store).applyRegisterWorker),
	CmdHeartbeat:      row((*Store).authorizeHeartbeat, (*Store).applyHeartbeat),
	CmdCreateVolume:   row((*Store).authorizeCreateVolume, (*Store).applyCreateVolume),
	CmdUpdateVolume:   row((*Store).authorizeUpdateVolume, (*Store).applyUpdateVolume),
	CmdDestroyVolume:  row((*Store).authorizeDestroyVolume, (*Store).applyDestroyVolume),
	CmdSetVolumeKey: row((*Store).authorizeSetVolumeKey, func(s *Store, c *SetVolumeKeyCmd) *Result {
		return s.applyRetiredKey(CmdSetVolumeKey, c.Header, c.ID)
	}),
	CmdKeyAccess: row((*Store).authorizeKeyAccess, func(s *Store, c *KeyAccessCmd) *Result {
		return s.applyRetiredKey(CmdKeyAccess, c.Header, c.ID)
	}),
	CmdCreateMachine:  row((*Store).authorizeCreateMachine, (*Store).applyCreateMachine),
	CmdUpdateMachine:  row((*Store).authorizeUpdateMachine, (*Store).applyUpdateMachine),
	CmdPlan:           rowAt((*Store).authorizePlan, (*Store).applyPlan),
	CmdPropose:        rowAt((*Store).authorizePropose, (*Store).applyPropose),
	CmdRevokeCert:     row((*Store).authorizeRevokeCert, (*Store).applyRevokeCert),
	CmdGC:             rowAt((*Store).authorizeGC, (*Store).applyGC),
	CmdSetWorkerKey:   row((*Store).authorizeSetWorkerKey, (*Store).applySetWorkerKey),
	CmdSetRecoveryKey: row((*Store).authorizeSetRecoveryKey, (*Store).applySetRecoveryKey),
	CmdPutEnvelopes:   row((*Store).authorizePutEnvelopes, (*Store).applyPutEnvelopes),
	CmdExtendVolume:   row((*Store).authorizeExtendVolume, (*Store).applyExtendVolume),
	CmdForkVolume:     row((*Store).authorizeForkVolume, (*Store).applyForkVolume),
	CmdCordon:         row((*Store).authorizeCordon, (*Store).applyCordon),
	CmdDrain:          rowAt((*Store).authorizeDrain, (*Store).applyDrain),
	CmdDrainUpdate:    rowAt((*Store).authorizeDrainUpdate, (*Store).applyDrainUpdate),
	CmdForkServe:      row((*Store).authorizeForkServe, (*Store).applyForkServe),
}

// byPayload finds a payload's row: Authorize is given the payload alone.
var byPayload = func() map[reflect.Type]commandRow {
	m := make(map[reflect.Type]commandRow, len(commands))
	for _, c := range commands {
		m[reflect.TypeOf(c.payload())] = c
	}
	return m
}()

// row is the row of a command whose apply does not need the log index.
func row[C any](authorize func(*Store, *C) *Refusal, apply func(*Store, *C) *Result) commandRow {
	return rowAt(authorize, func(s *Store, _ uint64, c *C) *Result { return apply(s, c) })
}

// rowAt is the row of a command whose apply records the log index.
func rowAt[C any](authorize func(*Store, *C) *Refusal, apply func(*Store, uint64, *C) *Result) commandRow {
	return commandRow{
		payload:   func() any { return new(C) },
		authorize: func(s *Store, p any) *Refusal { return authorize(s, p.(*C)) },
		apply:     func(s *Store, index uint64, p any) *Result { return apply(s, index, p.(*C)) },
	}
}
