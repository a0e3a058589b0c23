package main

import (
	"errors"

	"github.com/ferry-dev/ferry/api"
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

// refusalCode maps an API refusal (a client-side kind) to the "refused" exit code.
func refusalCode(err error) int {
	var e *api.Error
	if errors.As(err, &e) && e.Kind.ClientSide() {
		return ExitRefused
	}
	return ExitFailed
}
