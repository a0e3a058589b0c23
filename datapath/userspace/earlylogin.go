package userspace

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/luks"
)

// An early login is a prestarted clone's first iSCSI session, begun when
// the source publishes its export (export_started, while the target
// prepares and the source stops its machine) instead of after `exported`:
// the TLS handshake and the login (20–75 ms on a busy 2-core host,
// docs/profiles.md) then leave the machine's pause. Of the volume it reads
// only the LUKS2 header and its keyslots (luks.HeaderImage), which the
// machine never writes (its writes land past the data offset) and ferry
// changes only under the volume's lock, which the migration holds: the
// unlock in the pause then reads nothing over the network. The key it
// yields is checked there against the header's digest and the carried
// layout, and any failure reads the header again through the clone. The
// rest of the volume is read only once the final configuration came with
// `exported`, which the source proposes after it froze the volume. The
// session is checked as any clone's: the source worker's certificate, not
// revoked.

// earlyLogin is a login begun from a preliminary clone configuration.
type earlyLogin struct {
	clone  Clone
	deny   *iscsi.DenyList // the server's list once adopted
	cancel context.CancelFunc
	done   chan struct{}
	lun    *iscsi.LUN
	err    error
	image  *luks.HeaderImage // nil when it could not be read or does not match the layout
	// alloc is the clone engine's memory for this volume, made beside the
	// login (its first touch is milliseconds the pause no longer waits
	// for); set before allocated closes.
	alloc     *dmclone.Prealloc
	allocated chan struct{}
}

// startEarlyLogin begins the login cfg's clone would make, in the
// background, bounded by the initiator's timeout and ctx.
func startEarlyLogin(ctx context.Context, log zerolog.Logger, cfg Config) (*earlyLogin, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	c := cfg.Clone
	if c == nil || c.Portal == "" || c.SourcePath != "" || cfg.Raw {
		return nil, errors.New("an early login needs the clone of an export")
	}
	e := &earlyLogin{clone: *c, deny: &iscsi.DenyList{}, done: make(chan struct{}), allocated: make(chan struct{})}
	ic, err := initiatorConfig(c, e.deny, cfg.VolumeID)
	if err != nil {
		return nil, err
	}
	go func() {
		defer close(e.allocated)
		e.alloc = dmclone.Preallocate(cfg.Layout.DeviceSize(), regionSize(c.RegionSize))
	}()
	dctx, cancel := context.WithCancel(ctx)
	e.cancel = cancel
	t0 := time.Now()
	go func() {
		defer close(e.done)
		e.lun, e.err = iscsi.Dial(dctx, log, ic)
		if e.err != nil {
			return
		}
		took := time.Since(t0)
		e.image = readHeaderImage(log, e.lun, cfg.Layout)
		log.Info().Str("portal", c.Portal).Dur("took", took).Bool("header_image", e.image != nil).Dur("header_took", time.Since(t0)-took).
			Msg("logged in to the source before its export was final")
	}()
	return e, nil
}

// readHeaderImage reads the volume's LUKS2 header and keyslots from the
// source's export, or returns nil (saying why) when they do not read or
// do not match the carried layout: the pause then reads them itself.
func readHeaderImage(log zerolog.Logger, lun *iscsi.LUN, layout luks.Layout) *luks.HeaderImage {
	if lun.Size() != layout.DeviceSize() {
		return nil // refused with its reason once the clone adopts the session
	}
	// One request for both header copies and a default keyslot's 256 000
	// bytes, which follow them.
	im, err := luks.ReadHeaderImage(lun, lun.Size(), min(layout.DataOffset, 2*max(layout.MetadataSize, 16<<10)+256<<10))
	if err == nil {
		if _, err = im.Header().MatchLayout(layout, lun.Size()); err != nil {
			im.Wipe()
		}
	}
	if err != nil {
		log.Info().Err(err).Msg("the source's LUKS2 header was not kept from the early login; the clone reads it in the pause")
		return nil
	}
	return im
}

// preallocated is the clone engine's memory made beside the login, or nil
// when there is no login or it is not made yet (Open then allocates: no
// wait in the pause).
func (e *earlyLogin) preallocated() *dmclone.Prealloc {
	if e == nil {
		return nil
	}
	select {
	case <-e.allocated:
		return e.alloc
	default:
		return nil
	}
}

// adopt returns e when clone c reaches the export e logged in to, with the
// same identity checks; nil otherwise (or when e is nil).
func (e *earlyLogin) adopt(c *Clone) *earlyLogin {
	if e == nil || c == nil || c.SourcePath != "" {
		return nil
	}
	same := c.Portal == e.clone.Portal && c.IQN == e.clone.IQN && c.Source == e.clone.Source &&
		(c.TLS == nil) == (e.clone.TLS == nil) && (c.TLS == nil || c.TLS.Dir == e.clone.TLS.Dir && c.TLS.Name == e.clone.TLS.Name)
	if !same {
		return nil
	}
	return e
}

// wait returns the session once the login ended. Its deny list is the
// final configuration's by now (initiatorConfig set it): a session with a
// certificate revoked since it logged in is cut and refused.
func (e *earlyLogin) wait(ctx context.Context) (*iscsi.LUN, error) {
	select {
	case <-e.done:
	case <-ctx.Done():
		e.close()
		return nil, ctx.Err()
	}
	if e.err != nil {
		return nil, e.err
	}
	if n := e.lun.CutDenied(); n > 0 {
		e.lun.Close()
		return nil, errors.New("the source's certificate was revoked after the early login")
	}
	return e.lun, nil
}

// close ends the login and its session; nil-safe, idempotent.
func (e *earlyLogin) close() {
	if e == nil {
		return
	}
	e.cancel()
	<-e.done
	if e.lun != nil {
		e.lun.Close()
	}
	e.image.Wipe()
}

// initiatorConfig is how clone c reaches its source's export: over mutual
// TLS, the source worker's certificate only, none on deny (which is set to
// c.Denied).
func initiatorConfig(c *Clone, deny *iscsi.DenyList, vol string) (iscsi.InitiatorConfig, error) {
	ic := iscsi.InitiatorConfig{Portal: c.Portal, IQN: c.IQN, Timeout: 10 * time.Second}
	if c.TLS == nil {
		return ic, nil
	}
	var err error
	// The export must be the source worker's: anyone else's certificate
	// (or none) could serve forged ciphertext.
	if ic.TLS, err = tlsutil.PeerClientConfig(c.TLS.Dir, c.TLS.Name, tlsutil.Identity{Name: c.Source, Kind: tlsutil.KindWorker}); err != nil {
		return ic, fmt.Errorf("TLS to the source's export: %w", err)
	}
	// ... and not revoked: a revoked source's host may be in anyone's hands.
	if _, err := deny.Set(c.Denied); err != nil {
		return ic, fmt.Errorf("datapath config for %s: %w", vol, err)
	}
	ic.Denied = deny.Denied
	return ic, nil
}
