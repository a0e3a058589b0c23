package security

import (
	"os"
	"testing"

	"github.com/ferry-dev/ferry/iscsi"
)

// TestMain lets the test binary double as the iSCSI export child, so the
// export tests run the agent's exporter without a prebuilt ferry binary.
func TestMain(m *testing.M) {
	if iscsi.IsExportChild() {
		iscsi.ServeChild()
	}
	os.Exit(m.Run())
}
