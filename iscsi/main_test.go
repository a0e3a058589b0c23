package iscsi

import (
	"os"
	"testing"
)

// TestMain lets the test binary double as the export child, so tests run
// without a prebuilt ferry binary.
func TestMain(m *testing.M) {
	if IsExportChild() {
		ServeChild()
	}
	os.Exit(m.Run())
}
