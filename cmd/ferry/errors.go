package main

import (
	"errors"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/operator"
)

// exitCode maps an error of a package function to the exit code: bad input
// is usage, a refusal (ours or the server's) is refused, the rest failed.
func exitCode(err error) int {
	switch {
	case errors.Is(err, operator.ErrInvalid):
		return ExitUsage
	case errors.Is(err, operator.ErrRefused):
		return ExitRefused
	}
	return refusalCode(err)
}

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
