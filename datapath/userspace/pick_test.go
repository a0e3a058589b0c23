package userspace

import (
	"errors"
	"strings"
	"testing"
)

func TestPickBlockExport(t *testing.T) {
	missing := errors.New("no NBD block export: missing NBD devices (modprobe nbd)")
	for _, c := range []struct {
		release string
		probe   error
		want    string
		why     string
	}{
		{"6.1.0-28-amd64", nil, ExportFUSE, "predates 6.13"}, // Debian 12: the test VM's stall
		{"6.12.9", nil, ExportFUSE, "predates 6.13"},
		{"6.13.0", nil, ExportNBD, "kernel dm-crypt"},
		{"6.18.44-fc-v657", nil, ExportNBD, "kernel dm-crypt"},
		{"7.0-rc1", nil, ExportNBD, "kernel dm-crypt"},
		{"6.18.44", missing, ExportFUSE, "modprobe nbd"}, // what the host lacks comes first
		{"", nil, ExportFUSE, "predates"},                // unknown: the safe side
		{"garbage", nil, ExportFUSE, "predates"},
		{"6.x.1", nil, ExportFUSE, "predates"},
	} {
		got, why := pickBlockExport(c.release, c.probe)
		if got != c.want || !strings.Contains(why, c.why) {
			t.Errorf("kernel %q, probe %v: picked %s (%s), want %s (…%s…)", c.release, c.probe, got, why, c.want, c.why)
		}
	}
}
