package stepmark

import (
	"path/filepath"
	"testing"
)

func TestMarkSurvivesANewDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "steps")
	d := Dir(dir)
	if d.Done("mig-1", "reaped") {
		t.Fatal("done before marking")
	}
	if err := d.Mark("mig-1", "reaped"); err != nil {
		t.Fatal(err)
	}
	again := Dir(dir) // a restarted agent
	if !again.Done("mig-1", "reaped") || again.Done("mig-1", "net-source") || again.Done("mig-2", "reaped") {
		t.Fatal("a mark is not found again, or is found for another step or migration")
	}
}
