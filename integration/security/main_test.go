package security

import (
	"context"
	"os"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/iscsi"
)

// TestMain lets the test binary double as the iSCSI export child and as
// `ferry volume serve`, so the tests run the agent's exporter and the
// userspace data path without a prebuilt ferry binary.
func TestMain(m *testing.M) {
	if iscsi.IsExportChild() {
		iscsi.ServeChild()
	}
	if len(os.Args) > 4 && os.Args[1] == "volume" && os.Args[2] == "serve" && os.Args[3] == "--config" {
		log := zerolog.New(os.Stderr).With().Timestamp().Logger()
		if err := userspace.ServeConfigFile(context.Background(), log, os.Args[4], os.Stdin); err != nil {
			log.Error().Err(err).Msg("volume serve")
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}
