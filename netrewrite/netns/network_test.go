package netns

import (
	"os"
	"testing"

	"github.com/ferry-dev/ferry/netrewrite"
)

func TestNetworkRecordsBeforeApplying(t *testing.T) {
	n := &Network{Worker: "w1", Dir: t.TempDir()}
	mn := netrewrite.MachineNet{MachineNS: Name("w1", "m1")}
	if err := n.record(mn); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(n.recPath("m1")); err != nil {
		t.Fatalf("machine network record not at %s: %v", n.recPath("m1"), err)
	}
}
