package agent

import (
	"fmt"
	"path/filepath"

	"github.com/ferry-dev/ferry/fsm"
)

// localID refuses an ID from the control plane that is not safe to join
// under a data folder: the store's ID rule, and filepath.IsLocal as the last
// word before a path is built or removed (".", ".." or "a/../.." would
// reach outside volumes/, mnt/ or exports/).
func localID(kind, id string) error {
	if !fsm.ValidID(id) || !filepath.IsLocal(id) {
		return fmt.Errorf("%s id %q is not a safe name; refusing to touch files for it", kind, id)
	}
	return nil
}

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
