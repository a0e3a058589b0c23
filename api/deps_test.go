package api

import (
	"os/exec"
	"strings"
	"testing"
)

// The client is imported by agents and the CLI; it must stay free of the
// server side, so a worker binary links no raft and no data path through it.
func TestClientDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	forbidden := []string{
		"github.com/ferry-dev/ferry/server",
		"github.com/ferry-dev/ferry/agent",
		"github.com/ferry-dev/ferry/datapath",
		"github.com/hashicorp/raft",
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list -deps returned too little to judge: %q", out)
	}
	for _, dep := range deps {
		for _, f := range forbidden {
			if dep == f || strings.HasPrefix(dep, f+"/") {
				t.Errorf("api depends on %s", dep)
			}
		}
	}
}
