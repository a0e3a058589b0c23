package fsm

import (
	"os/exec"
	"strings"
	"testing"
)

// The state machine is a domain package: HTTP belongs to the server and
// replication to raft, so neither may leak into what fsm depends on (the
// api client imports fsm for its wire types).
func TestDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		switch {
		case dep == "net/http", strings.HasPrefix(dep, "net/http/"):
			t.Errorf("fsm depends on %s: map refusals to HTTP statuses in the server", dep)
		case strings.HasPrefix(dep, "github.com/hashicorp/raft"):
			t.Errorf("fsm depends on %s: adapt the store to raft in the server", dep)
		}
	}
}
