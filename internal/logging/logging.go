// Package logging builds the one zerolog logger a process passes down.
// Daemons log JSON; the CLI logs to the console. Every component adds its own
// "component" field with For, so a line always says where it came from.
package logging

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/rs/zerolog"
)

// Format selects how log lines are written.
type Format string

const (
	JSON    Format = "json"
	Console Format = "console"
)

// New returns a logger writing to w in the given format at the given level
// ("debug", "info", "warn", "error").
func New(w io.Writer, format Format, level string) (zerolog.Logger, error) {
	lvl, err := zerolog.ParseLevel(strings.ToLower(level))
	if err != nil || level == "" {
		return zerolog.Nop(), fmt.Errorf("log level %q: use debug, info, warn or error", level)
	}
	switch format {
	case JSON:
	case Console:
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: time.TimeOnly}
	default:
		return zerolog.Nop(), fmt.Errorf("log format %q: use json or console", format)
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger(), nil
}

// Default is the logger used when a command is run without flags: console on stderr, info.
func Default() zerolog.Logger {
	l, _ := New(os.Stderr, Console, "info")
	return l
}

// For returns a child logger tagged with a component name.
func For(l zerolog.Logger, component string) zerolog.Logger {
	return l.With().Str("component", component).Logger()
}
