package agent

import "context"

// SetVolumeKey: the fake control plane accepts the destination's key.
func (f *fakeCP) SetVolumeKey(context.Context, string, []byte) error { return nil }
