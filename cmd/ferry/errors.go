package main

import (
	"errors"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

func asAPIError(err error, target **api.Error) bool { return errors.As(err, target) }

func apiMachineState(st fsm.MachineState) api.MachineUpdate { return api.MachineUpdate{State: &st} }

type zerologLevel = zerolog.Level

func parseLevel(s string) zerolog.Level {
	l, err := zerolog.ParseLevel(s)
	if err != nil {
		return zerolog.InfoLevel
	}
	return l
}
