package fsm

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"regexp"
	"strings"
	"time"
	"unicode"
)

// Input limits. Every participant-written field has one: a record is read
// by every replica and every watcher, so an oversized field costs everyone.
const (
	MaxIDLen         = 63              // workers, volumes, machines, migrations, servers
	MaxStepIDLen     = 128             // step IDs are opaque tokens, never paths
	MaxTextLen       = 1024            // reasons and errors
	MaxSpecBytes     = 64 << 10        // a machine's driver spec
	MaxKnownZero     = 4096            // known-zero ranges per report
	MaxCapacity      = 64              // concurrent migrations a worker may claim
	MaxLeaseTTL      = 2 * time.Minute // the longest lease a worker may ask for
	MaxRetention     = 90 * 24 * time.Hour
	MinGCRetention   = time.Second // GC keeps a record at least this long after it ended
	maxAddrTextLen   = 64          // an IP address in text
	maxPortalLen     = 80          // host:port
	maxIQNLen        = 223         // RFC 7143
	maxServerAddrLen = 255         // raft and API addresses of servers
)

var idRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)

// ValidID reports whether id may name a worker, volume, machine, migration
// or server. IDs become file names, namespace names, IQN parts and lock
// names, so the rule is narrow: lower-case letters, digits, '-' and '_',
// starting with a letter or digit (never ".", ".." or a leading dot), at
// most 63 bytes.
func ValidID(id string) bool { return idRE.MatchString(id) }

// CheckID returns an invalid refusal naming what when id breaks the rule.
func CheckID(what, id string) *Refusal {
	if ValidID(id) {
		return nil
	}
	shown := id
	if len(shown) > 64 {
		shown = shown[:64] + "…"
	}
	return refuse(RefuseInvalid, CodeInvalid, "%s id %q: use 1-%d lower-case letters, digits, '-' or '_', starting with a letter or digit", what, shown, MaxIDLen)
}

func checkStepID(id string) *Refusal {
	if len(id) > MaxStepIDLen {
		return refuse(RefuseInvalid, CodeInvalid, "step id is %d bytes; at most %d", len(id), MaxStepIDLen)
	}
	for _, r := range id {
		if r <= ' ' || r > '~' {
			return refuse(RefuseInvalid, CodeInvalid, "step id holds a space or a non-printable character")
		}
	}
	return nil
}

func checkText(what, s string) *Refusal {
	if len(s) > MaxTextLen {
		return refuse(RefuseInvalid, CodeInvalid, "%s is %d bytes; at most %d", what, len(s), MaxTextLen)
	}
	return nil
}

// ParseWorkerAddress parses the address a worker registers: one IP, not a
// prefix, not a host:port, and one a peer can be admitted from (an
// unspecified, multicast or link-local address would open an export to
// more than that worker).
func ParseWorkerAddress(s string) (netip.Addr, error) {
	if len(s) > maxAddrTextLen {
		return netip.Addr{}, fmt.Errorf("address is %d bytes long", len(s))
	}
	if strings.Contains(s, "/") {
		return netip.Addr{}, fmt.Errorf("address %q is a prefix; give one IP", s)
	}
	ip, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("address %q: %v", s, err)
	}
	switch {
	case ip.Zone() != "":
		return netip.Addr{}, fmt.Errorf("address %q has a zone", s)
	case ip.IsUnspecified(), ip.IsMulticast(), ip.IsLinkLocalUnicast(), ip.IsLinkLocalMulticast(), ip.IsInterfaceLocalMulticast():
		return netip.Addr{}, fmt.Errorf("address %q is not the unicast address of one host", s)
	}
	return ip.Unmap(), nil
}

// ClampLeaseTTL is the lease a worker gets for asking ttl: the default for
// zero or less, at most MaxLeaseTTL (a worker must not outlive its failure).
func ClampLeaseTTL(ttl time.Duration) time.Duration {
	if ttl <= 0 {
		return DefaultLeaseTTL
	}
	return min(ttl, MaxLeaseTTL)
}

func (w *Worker) validate() *Refusal {
	if r := CheckID("worker", w.Name); r != nil {
		return r
	}
	if err := w.Report.Validate(); err != nil {
		return refuse(RefuseInvalid, CodeInvalid, "worker %s: %v", w.Name, err)
	}
	if w.KEK != nil {
		return refuse(RefuseInvalid, CodeInvalid, "worker %s: a registration carries no key-encryption key; the worker sets its own with PUT /v1/workers/%s/key", w.Name, w.Name)
	}
	if w.Address != "" {
		if _, err := ParseWorkerAddress(w.Address); err != nil {
			return refuse(RefuseInvalid, CodeInvalid, "worker %s: %v", w.Name, err)
		}
	}
	if w.Capacity < 0 || w.Capacity > MaxCapacity {
		return refuse(RefuseInvalid, CodeInvalid, "worker %s: capacity %d: use 0 (default) to %d", w.Name, w.Capacity, MaxCapacity)
	}
	return nil
}

// MaxVolumeSize bounds what extend_volume accepts (64 TiB): far above any
// real volume, low enough that no offset computed from it overflows.
const MaxVolumeSize = 64 << 40

func (v *Volume) validate() *Refusal {
	if r := CheckID("volume", v.ID); r != nil {
		return r
	}
	if r := CheckID("worker", v.Worker); r != nil {
		return r
	}
	if v.AttachedMachine != "" {
		if r := CheckID("machine", v.AttachedMachine); r != nil {
			return r
		}
	}
	if v.Size < 0 {
		return refuse(RefuseInvalid, CodeInvalid, "volume %s: size %d is negative", v.ID, v.Size)
	}
	return nil
}

func checkSpec(id string, spec json.RawMessage) *Refusal {
	if len(spec) > MaxSpecBytes {
		return refuse(RefuseInvalid, CodeInvalid, "machine %s: spec is %d bytes; at most %d", id, len(spec), MaxSpecBytes)
	}
	if len(spec) > 0 && !json.Valid(spec) {
		return refuse(RefuseInvalid, CodeInvalid, "machine %s: spec is not JSON", id)
	}
	return nil
}

func (m *Machine) validate() *Refusal {
	if r := CheckID("machine", m.ID); r != nil {
		return r
	}
	if r := CheckID("worker", m.Worker); r != nil {
		return r
	}
	if m.Volume != "" {
		if r := CheckID("volume", m.Volume); r != nil {
			return r
		}
	}
	if m.Addr6PN != "" {
		b, err := parse6PN(m.Addr6PN)
		if err != nil {
			return refuse(RefuseInvalid, CodeInvalid, "machine %s: %v", m.ID, err)
		}
		// The address and the numbers the store checks a cutover against
		// must agree.
		if org := binary.BigEndian.Uint32(b[2:6]); m.Network != 0 && org != m.Network {
			return refuse(RefuseInvalid, CodeInvalid, "machine %s: address %s is in org %d, the machine in org %d", m.ID, m.Addr6PN, org, m.Network)
		}
		if no := binary.BigEndian.Uint32(b[10:14]); m.MachineNo != 0 && no != m.MachineNo {
			return refuse(RefuseInvalid, CodeInvalid, "machine %s: address %s has machine number %d, the machine %d", m.ID, m.Addr6PN, no, m.MachineNo)
		}
	}
	return checkSpec(m.ID, m.Spec)
}

// parse6PN reads a 6PN address (fdaa:ORG:HOST:MACHINE:0) as one IPv6
// address and returns its 16 bytes.
func parse6PN(s string) ([16]byte, error) {
	if len(s) > maxAddrTextLen || strings.Contains(s, "/") {
		return [16]byte{}, fmt.Errorf("6PN address %q: give one IPv6 address", s)
	}
	ip, err := netip.ParseAddr(s)
	if err != nil || !ip.Is6() || ip.Is4In6() || ip.Zone() != "" {
		return [16]byte{}, fmt.Errorf("6PN address %q is not a plain IPv6 address", s)
	}
	b := ip.As16()
	if b[0] != 0xfd || b[1] != 0xaa || b[14] != 0 || b[15] != 0 {
		return [16]byte{}, fmt.Errorf("6PN address %q is not in fdaa::/16 with zero low bits", s)
	}
	return b, nil
}

// expected6PN is the address a machine of org network org and number no
// has on the worker with host id host (netrewrite.Build, without importing
// the network code into the store).
func expected6PN(org, host, no uint32) (netip.Addr, bool) {
	if org == 0 || host == 0 || no == 0 {
		return netip.Addr{}, false
	}
	var b [16]byte
	b[0], b[1] = 0xfd, 0xaa
	binary.BigEndian.PutUint32(b[2:6], org)
	binary.BigEndian.PutUint32(b[6:10], host)
	binary.BigEndian.PutUint32(b[10:14], no)
	return netip.AddrFrom16(b), true
}

// iqnSuffix is how an export's IQN ends for migration id (iscsi.MigrationIQN).
func iqnSuffix(id string) string { return ":ferry:" + id }

func checkIQN(m *Migration, iqn string) *Refusal {
	if len(iqn) > maxIQNLen || !strings.HasPrefix(iqn, "iqn.") {
		return refuse(RefuseInvalid, CodeInvalid, "export IQN: want iqn.YYYY-MM.domain:ferry:%s, at most %d bytes", m.ID, maxIQNLen)
	}
	for _, r := range iqn {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '.' || r == ':') {
			return refuse(RefuseInvalid, CodeInvalid, "export IQN holds %q; only a-z, 0-9, '-', '.' and ':' are allowed", r)
		}
	}
	if !strings.HasSuffix(iqn, iqnSuffix(m.ID)) {
		return refuse(RefuseInvalid, CodeInvalid, "export IQN %q does not name migration %s (want a name ending in %q)", iqn, m.ID, iqnSuffix(m.ID))
	}
	return nil
}

// checkPortal accepts only the source worker's registered address, on a
// real port: the target connects wherever the portal points.
func checkPortal(src *Worker, portal string) *Refusal {
	if len(portal) > maxPortalLen {
		return refuse(RefuseInvalid, CodeInvalid, "export portal is %d bytes long", len(portal))
	}
	ap, err := netip.ParseAddrPort(portal)
	if err != nil || ap.Port() == 0 {
		return refuse(RefuseInvalid, CodeInvalid, "export portal %q: want ip:port", portal)
	}
	if src == nil || src.Address == "" {
		return refuse(RefuseConflict, CodeConflict, "the source worker registered no address: its export portal cannot be checked")
	}
	want, err := ParseWorkerAddress(src.Address)
	if err != nil || ap.Addr().Unmap() != want {
		return refuse(RefuseInvalid, CodeInvalid, "export portal %s is not at the source worker's registered address %s", portal, src.Address)
	}
	return nil
}

// checkRanges accepts known-zero ranges that lie inside [lo, hi): the
// encrypted data area of the device. The header and keyslots are never
// declared zero, so a source cannot make the target skip them.
func checkRanges(rs []Range, lo, hi int64) *Refusal {
	if len(rs) > MaxKnownZero {
		return refuse(RefuseInvalid, CodeInvalid, "known_zero has %d ranges; coalesce to at most %d", len(rs), MaxKnownZero)
	}
	if err := validRanges(rs); err != nil {
		return refuse(RefuseInvalid, CodeInvalid, "known_zero: %v", err)
	}
	for _, r := range rs {
		if r.Off < lo || r.End() > hi {
			return refuse(RefuseInvalid, CodeInvalid, "known_zero range %d+%d lies outside the device's data area [%d, %d)", r.Off, r.Len, lo, hi)
		}
	}
	return nil
}

// ClipRanges cuts ranges to [lo, hi), dropping what lies outside: a source
// reports only the holes of its data area.
func ClipRanges(rs []Range, lo, hi int64) []Range {
	var out []Range
	for _, r := range rs {
		off, end := max(r.Off, lo), min(r.End(), hi)
		if end > off {
			out = append(out, Range{Off: off, Len: end - off})
		}
	}
	return out
}

// DataArea is where known-zero ranges of migration m may lie: the carried
// layout's data segment, else the whole source volume.
func DataArea(m *Migration, volumeSize int64) (lo, hi int64) {
	if m.Layout != nil {
		return m.Layout.DataOffset, m.Layout.DeviceSize()
	}
	return 0, volumeSize
}

func checkPayloadText(p *EventPayload) *Refusal {
	if r := checkText("reason", p.Reason); r != nil {
		return r
	}
	if r := checkText("error", p.Error); r != nil {
		return r
	}
	if p.TargetVolume != "" {
		if r := CheckID("target volume", p.TargetVolume); r != nil {
			return r
		}
	}
	if p.New6PN != "" {
		if _, err := parse6PN(p.New6PN); err != nil {
			return refuse(RefuseInvalid, CodeInvalid, "new_6pn: %v", err)
		}
	}
	return nil
}

// printable reports whether s holds no control characters (names that end
// up in logs and terminals).
func printable(s string) bool {
	return strings.IndexFunc(s, func(r rune) bool { return unicode.IsControl(r) }) < 0
}

// Validate checks a command's own fields (IDs, sizes, formats) without the
// store: the first half of what Authorize checks, usable anywhere. Every
// command type has its validate method (a test walks the dispatch table).
func Validate(cmd any) *Refusal {
	if v, ok := cmd.(interface{ validate() *Refusal }); ok {
		return v.validate()
	}
	return refuse(RefuseInvalid, CodeInvalid, "%T is not a command of this build", cmd)
}

func (c *RegisterServerCmd) validate() *Refusal {
	if r := CheckID("server", c.Member.ID); r != nil {
		return r
	}
	if len(c.Member.RaftAddr) > maxServerAddrLen || len(c.Member.APIAddr) > maxServerAddrLen ||
		!printable(c.Member.RaftAddr) || !printable(c.Member.APIAddr) {
		return refuse(RefuseInvalid, CodeInvalid, "server %s: addresses must be printable and at most %d bytes", c.Member.ID, maxServerAddrLen)
	}
	return nil
}

func (c *RegisterWorkerCmd) validate() *Refusal {
	return c.Worker.validate()
}

func (c *HeartbeatCmd) validate() *Refusal {
	if r := CheckID("worker", c.Name); r != nil {
		return r
	}
	if err := c.Report.Validate(); err != nil {
		return refuse(RefuseInvalid, CodeInvalid, "worker %s: %v", c.Name, err)
	}
	return nil
}

func (c *CordonCmd) validate() *Refusal {
	if r := CheckID("worker", c.Worker); r != nil {
		return r
	}
	return checkText("cordon reason", c.Reason)
}

func (c *DrainCmd) validate() *Refusal {
	if r := CheckID("drain", c.ID); r != nil {
		return r
	}
	if r := CheckID("worker", c.Worker); r != nil {
		return r
	}
	if len(c.Targets) > maxDrainTargets {
		return refuse(RefuseInvalid, CodeInvalid, "drain names more than %d targets", maxDrainTargets)
	}
	for _, t := range c.Targets {
		if r := CheckID("target worker", t); r != nil {
			return r
		}
	}
	if c.Parallel < 0 || c.Parallel > MaxDrainParallel || c.Deadline < 0 || c.BandwidthBPS < 0 {
		return refuse(RefuseInvalid, CodeInvalid, "drain needs 0..%d parallel migrations, a deadline >= 0 and a bandwidth >= 0", MaxDrainParallel)
	}
	return nil
}

func (c *CreateVolumeCmd) validate() *Refusal {
	return c.Volume.validate()
}

func (c *UpdateVolumeCmd) validate() *Refusal {
	if r := CheckID("volume", c.ID); r != nil {
		return r
	}
	if c.AttachedMachine != nil && *c.AttachedMachine != "" {
		if r := CheckID("machine", *c.AttachedMachine); r != nil {
			return r
		}
	}
	if c.Size != nil && *c.Size < 0 {
		return refuse(RefuseInvalid, CodeInvalid, "volume %s: size %d is negative", c.ID, *c.Size)
	}
	return nil
}

func (c *ExtendVolumeCmd) validate() *Refusal {
	if r := CheckID("volume", c.ID); r != nil {
		return r
	}
	if c.Size <= 0 || c.Size > MaxVolumeSize || c.Size%512 != 0 {
		return refuse(RefuseInvalid, CodeInvalid, "volume %s: size %d must be a positive multiple of 512 bytes, at most %d", c.ID, c.Size, int64(MaxVolumeSize))
	}
	return nil
}

func (c *ForkVolumeCmd) validate() *Refusal {
	for _, id := range []string{c.ID, c.Source} {
		if r := CheckID("volume", id); r != nil {
			return r
		}
	}
	if r := CheckID("worker", c.Worker); r != nil {
		return r
	}
	return nil
}

func (c *ForkServeCmd) validate() *Refusal {
	if r := CheckID("volume", c.ID); r != nil {
		return r
	}
	if c.Released == (c.Export != nil) {
		return refuse(RefuseInvalid, CodeInvalid, "fork_serve of volume %s: give either an export (with its layout) or released", c.ID)
	}
	if c.Export != nil && (c.Layout == nil || c.Export.Portal == "" || c.Export.IQN == "") {
		return refuse(RefuseInvalid, CodeInvalid, "fork_serve of volume %s: an export needs a portal, an IQN and the copy's layout", c.ID)
	}
	if c.Layout != nil {
		if err := c.Layout.Validate(); err != nil {
			return refuse(RefuseInvalid, CodeInvalid, "volume %s: %v", c.ID, err)
		}
	}
	if err := validRanges(c.KnownZero); err != nil {
		return refuse(RefuseInvalid, CodeInvalid, "known_zero: %v", err)
	}
	if len(c.KnownZero) > 4096 {
		return refuse(RefuseInvalid, CodeInvalid, "known_zero has %d ranges; coalesce to at most 4096", len(c.KnownZero))
	}
	return nil
}

func (c *DestroyVolumeCmd) validate() *Refusal {
	if c.Retention < 0 || c.Retention > MaxRetention {
		return refuse(RefuseInvalid, CodeInvalid, "retention %s: use 0 (default) to %s", c.Retention, MaxRetention)
	}
	return CheckID("volume", c.ID)
}

func (c *SetVolumeKeyCmd) validate() *Refusal {
	return CheckID("volume", c.ID)
}

func (c *KeyAccessCmd) validate() *Refusal {
	return CheckID("volume", c.ID)
}

func (c *CreateMachineCmd) validate() *Refusal {
	return c.Machine.validate()
}

func (c *UpdateMachineCmd) validate() *Refusal {
	if r := CheckID("machine", c.ID); r != nil {
		return r
	}
	if c.Volume != nil && *c.Volume != "" {
		if r := CheckID("volume", *c.Volume); r != nil {
			return r
		}
	}
	if c.Addr6PN != nil && *c.Addr6PN != "" {
		if _, err := parse6PN(*c.Addr6PN); err != nil {
			return refuse(RefuseInvalid, CodeInvalid, "machine %s: %v", c.ID, err)
		}
	}
	if c.Spec != nil {
		return checkSpec(c.ID, *c.Spec)
	}
	return nil
}

func (c *PlanCmd) validate() *Refusal {
	if r := CheckID("migration", c.ID); r != nil {
		return r
	}
	if r := CheckID("machine", c.Machine); r != nil {
		return r
	}
	if r := CheckID("worker", c.Target); r != nil {
		return r
	}
	return checkStepID(c.StepID)
}

func (c *ProposeCmd) validate() *Refusal {
	if r := CheckID("migration", c.ID); r != nil {
		return r
	}
	if r := checkStepID(c.StepID); r != nil {
		return r
	}
	return checkPayloadText(&c.Payload)
}

func (c *GCCmd) validate() *Refusal {
	if c.Retention < MinGCRetention {
		return refuse(RefuseInvalid, CodeInvalid, "gc retention %s is shorter than %s", c.Retention, MinGCRetention)
	}
	return nil
}

// These carry nothing to check on their own: their apply checks the
// records they name (a serial's format, a key's suite, envelopes).
func (c *RevokeCertCmd) validate() *Refusal     { return nil }
func (c *SetWorkerKeyCmd) validate() *Refusal   { return nil }
func (c *SetRecoveryKeyCmd) validate() *Refusal { return nil }
func (c *PutEnvelopesCmd) validate() *Refusal   { return nil }

// LocalID refuses an ID that is not safe to join under a data folder: the
// store's ID rule, and filepath.IsLocal as the last word before a path is
// built or removed ("." , ".." or "a/../.." would reach outside it). Agents
// and backends call it on every ID from the control plane.
func LocalID(kind, id string) error {
	if !ValidID(id) || !filepath.IsLocal(id) {
		return fmt.Errorf("%s id %q is not a safe name; refusing to touch files for it", kind, id)
	}
	return nil
}
