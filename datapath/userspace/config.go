// Package userspace is the userspace data path. It runs one volume's block stack in a process of
// its own (`ferry volume serve`), so an agent crash or restart never takes a
// running machine's disk away: the agent re-adopts the process through its
// control socket.
//
//	source worker, or target after hydration:  volume file -> LUKS2 view -> FUSE file
//	target during a migration:  iSCSI LUN + destination file -> clone engine -> LUKS2 view -> FUSE file
//
// The agent attaches the FUSE file to a loop device (losetup --direct-io=on)
// and mounts it for the machine.
package userspace

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/luks"
)

// Config is everything `ferry volume serve` needs except the passphrase,
// which arrives on its standard input so it never touches a disk or argv.
type Config struct {
	VolumeID string      `json:"volume_id"`
	DataPath string      `json:"data_path"` // local ciphertext: the volume file, or the migration's destination
	Layout   luks.Layout `json:"layout"`    // carried from the source; never the local cryptsetup's defaults
	MountDir string      `json:"mount_dir"` // FUSE mount point; the device file is MountDir/DeviceFile
	Socket   string      `json:"socket"`    // control socket (HTTP over unix)
	Clone    *Clone      `json:"clone,omitempty"`
	// FileName is the FUSE file's name in MountDir (default DeviceFile).
	FileName string `json:"file_name,omitempty"`
	// Raw exports the clone (or the file) itself, with no LUKS2 view and no
	// passphrase: `ferry clone` on plain images.
	Raw bool `json:"raw,omitempty"`
	// Loop: the process attaches its FUSE file to a loop device itself and
	// refuses to stop while that loop cannot be detached (`ferry clone --loop`);
	// the agent attaches loops on its own instead.
	Loop bool `json:"loop,omitempty"`
	// BlockExport is how the volume reaches the kernel: ExportFUSE (the
	// LUKS2 view in this process, a FUSE file the agent attaches to a loop
	// device) or ExportNBD (the ciphertext served as /dev/nbdN, kernel
	// dm-crypt over it as /dev/mapper/NBDCryptName(volume)).
	BlockExport string `json:"block_export,omitempty"`
}

// Block exports: how a served volume reaches the kernel.
const (
	ExportFUSE = "fuse"
	ExportNBD  = "nbd"
)

// NBDCryptName is the device-mapper name of a volume served over NBD.
func NBDCryptName(vol string) string { return "ferry-" + vol + "-nbd" }

// NBDDevice is the dm-crypt device of a volume served over NBD.
func NBDDevice(vol string) string { return "/dev/mapper/" + NBDCryptName(vol) }

func (c Config) nbd() bool { return c.BlockExport == ExportNBD }

// Device is the block device the agent mounts when the process serves one
// itself (ExportNBD); empty for FUSE, whose file the agent attaches.
func (c Config) Device() string {
	if c.nbd() {
		return NBDDevice(c.VolumeID)
	}
	return ""
}

// Clone configures the clone engine under the view while a migration hydrates.
type Clone struct {
	MetaPath   string `json:"meta_path"`
	Portal     string `json:"portal,omitempty"`
	IQN        string `json:"iqn,omitempty"`
	SourcePath string `json:"source_path,omitempty"` // a local source (file or device, read-only) instead of Portal and IQN
	// TLS: reach Portal over mutual TLS with this certificate, admitting
	// only Source's (the source worker); nil: plain iSCSI.
	TLS    *datapath.PeerTLS `json:"tls,omitempty"`
	Source string            `json:"source,omitempty"`
	// Denied are the revoked certificate serials (tlsutil.SerialString)
	// when the process starts: with TLS, a source presenting one is refused
	// at every handshake. The agent sends later lists over the control
	// socket (Process.SetDenied).
	Denied     []string         `json:"denied,omitempty"`
	RegionSize int64            `json:"region_size"`
	KnownZero  []blockdev.Range `json:"known_zero,omitempty"`
	Hydrate    bool             `json:"hydrate"` // start with background hydration enabled (resume after restart)
	RateLimit  int64            `json:"rate_limit_bps,omitempty"`
	// NoIdleBatches keeps background copies at BatchRegions while the
	// machine is idle (dmclone.Tunables.IdleBatchRegions 0).
	NoIdleBatches bool `json:"no_idle_batches,omitempty"`
	// AutoDissolve dissolves the clone as soon as every region is hydrated.
	AutoDissolve bool `json:"auto_dissolve,omitempty"`
}

// DeviceFile is the name of the FUSE file inside MountDir.
const DeviceFile = "disk"

// DevicePath is the file the agent attaches to a loop device.
func (c Config) DevicePath() string { return filepath.Join(c.MountDir, c.fileName()) }

func (c Config) fileName() string {
	if c.FileName == "" {
		return DeviceFile
	}
	return c.FileName
}

// Validate refuses a config the serve process could not honour.
func (c Config) Validate() error {
	switch {
	case c.VolumeID == "":
		return fmt.Errorf("datapath config: volume id is empty")
	case c.DataPath == "" || c.MountDir == "" || c.Socket == "":
		return fmt.Errorf("datapath config for %s: data_path, mount_dir and socket are required", c.VolumeID)
	}
	if !c.Raw {
		if err := c.Layout.Validate(); err != nil {
			return fmt.Errorf("datapath config for %s: %w", c.VolumeID, err)
		}
	}
	switch c.BlockExport {
	case "", ExportFUSE:
	case ExportNBD:
		if c.Raw || c.Loop {
			return fmt.Errorf("datapath config for %s: the nbd export serves a LUKS2 volume to dm-crypt; raw and loop exports use fuse", c.VolumeID)
		}
		if strings.ContainsAny(c.VolumeID, " \t\n/") || len(NBDCryptName(c.VolumeID)) > 127 {
			return fmt.Errorf("datapath config: volume id %q cannot name a device-mapper device", c.VolumeID)
		}
	default:
		return fmt.Errorf("datapath config for %s: block export %q: want fuse or nbd", c.VolumeID, c.BlockExport)
	}
	if strings.ContainsAny(c.FileName, "/\x00") || c.FileName == "." || c.FileName == ".." {
		return fmt.Errorf("datapath config for %s: file name %q must be a plain name", c.VolumeID, c.FileName)
	}
	if c.Clone != nil && (c.Clone.MetaPath == "" || (c.Clone.SourcePath == "") == (c.Clone.Portal == "" || c.Clone.IQN == "")) {
		return fmt.Errorf("datapath config for %s: a clone needs meta_path and either portal and iqn or source_path", c.VolumeID)
	}
	if c.Clone != nil && c.Clone.TLS != nil && c.Clone.Source == "" {
		return fmt.Errorf("datapath config for %s: a clone over TLS needs the source worker's name", c.VolumeID)
	}
	return nil
}
