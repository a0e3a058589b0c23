package agent

import (
	"github.com/ferry-dev/ferry/fsm"
)

// localID is fsm.LocalID: the store's ID rule and filepath.IsLocal before
// an ID becomes a path under volumes/, mnt/ or exports/.
func localID(kind, id string) error { return fsm.LocalID(kind, id) }

// migrationIDsLocal checks every ID of m the agent turns into a path.
func migrationIDsLocal(m *fsm.Migration) error {
	for _, c := range []struct{ kind, id string }{{"migration", m.ID}, {"volume", m.Volume}, {"machine", m.Machine}} {
		if err := localID(c.kind, c.id); err != nil {
			return err
		}
	}
	if m.TargetVol != "" {
		return localID("target volume", m.TargetVol)
	}
	return nil
}
