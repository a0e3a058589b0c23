package hostfs

import "testing"

func TestMountedAt(t *testing.T) {
	if src, ok := MountedAt("/proc"); !ok || src == "" {
		t.Fatalf("/proc not seen as a mount point (%q, %v)", src, ok)
	}
	if _, ok := MountedAt(t.TempDir()); ok {
		t.Fatal("a plain directory seen as a mount point")
	}
}
