package userspace

import (
	"context"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/luks"
)

// A clone over TLS must know which worker's certificate the export has to
// present: without it any certificate of the cluster could serve it.
func TestCloneOverTLSNeedsTheSourceWorker(t *testing.T) {
	cfg := Config{VolumeID: "v", DataPath: "/d", MountDir: "/m", Socket: "/s", Raw: true,
		Clone: &Clone{MetaPath: "/meta", Portal: "10.0.0.1:3260", IQN: "iqn.2026-12.dev.ferry:x",
			TLS: &datapath.PeerTLS{Dir: "/etc/ferry/tls", Name: "w-b"}}}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "source worker") {
		t.Fatalf("a TLS clone without a source worker: %v", err)
	}
	cfg.Clone.Source = "w-a"
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	v := &Backend{DataDir: t.TempDir(), Log: zerolog.Nop(), TLS: &datapath.PeerTLS{Dir: "/etc/ferry/tls", Name: "w-b"}}
	_, err := v.MountClone(context.Background(), datapath.CloneSpec{Volume: "v", Layout: luks.Layout{}, Portal: "10.0.0.1:3260", IQN: "iqn.x:y"}, nil, t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "source worker") {
		t.Fatalf("MountClone over TLS without a source worker: %v", err)
	}
}

// The clone's engine gets the defaults, the rate limit and, unless turned
// off, the idle batches.
func TestCloneTunables(t *testing.T) {
	c := &Clone{RegionSize: 4096, RateLimit: 1 << 20}
	tun := c.tunables()
	if tun.RateLimitBytesPerSec != 1<<20 || tun.BatchRegions != 256 || tun.IdleBatchRegions != 1024 {
		t.Fatalf("default tunables %+v: want the rate limit, 256-region batches and 1024-region idle batches", tun)
	}
	c.NoIdleBatches = true
	if tun := c.tunables(); tun.IdleBatchRegions != 0 || tun.BatchRegions != 256 {
		t.Fatalf("tunables with idle batches off %+v: want no idle batch, the same batch", tun)
	}
}
