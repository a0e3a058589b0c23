package exporter

import (
	"context"
	"os"
	"testing"

	"github.com/rs/zerolog"
)

type fixedRevoked []string

func (f fixedRevoked) RevokedSerials(context.Context) ([]string, error) { return f, nil }

// The deny list read from the servers is kept on disk and loaded by the
// next run before the servers answer: a restarted agent never starts with
// an empty list while a revoked peer exists.
func TestDenyListSurvivesARestart(t *testing.T) {
	dir := t.TempDir()
	x := &Exporter{Log: zerolog.Nop(), StateDir: dir, Revoked: fixedRevoked{"1f", "a0b1"}}
	if _, err := x.refreshDeny(context.Background()); err != nil {
		t.Fatal(err)
	}
	restarted := &Exporter{Log: zerolog.Nop(), StateDir: dir}
	if err := restarted.LoadDeny(); err != nil {
		t.Fatal(err)
	}
	for _, sn := range []string{"1f", "a0b1"} {
		if !restarted.denyList().Denied(sn) {
			t.Errorf("serial %s revoked before the restart is admitted after it", sn)
		}
	}
	if restarted.denyList().Denied("2") {
		t.Error("a serial never revoked is denied")
	}
	// A damaged file is an error naming it, not an empty list.
	if err := os.WriteFile(restarted.denyPath(), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := (&Exporter{Log: zerolog.Nop(), StateDir: dir}).LoadDeny(); err == nil {
		t.Fatal("a damaged deny list file loaded without an error")
	}
	// No file (a first start) is no error.
	if err := (&Exporter{Log: zerolog.Nop(), StateDir: t.TempDir()}).LoadDeny(); err != nil {
		t.Fatal(err)
	}
}
