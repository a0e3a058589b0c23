package luks

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferry-dev/ferry/blockdev"
)

func TestGrowView(t *testing.T) {
	l := testLayout(4096, 1<<20)
	f, err := blockdev.CreateSparse(filepath.Join(t.TempDir(), "data"), l.DeviceSize())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	v, err := OpenView(f, l, randomKey())
	if err != nil {
		t.Fatal(err)
	}
	old := bytes.Repeat([]byte("old!"), 1024)
	if _, err := v.WriteAt(old, l.PayloadSize-4096); err != nil {
		t.Fatal(err)
	}
	if err := GrowView(v, 2<<20); err == nil || !strings.Contains(err.Error(), "grow the device first") {
		t.Fatalf("grow past the device: %v", err)
	}
	if err := f.Grow(l.DataOffset + 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Grow(l.DataOffset); err == nil {
		t.Fatal("the file shrank")
	}
	for _, bad := range []int64{1 << 19, 2<<20 - 512} {
		if err := GrowView(v, bad); err == nil {
			t.Fatalf("GrowView(%d) succeeded", bad)
		}
	}
	if err := GrowView(blockdev.NewMem(8192), 8192); err == nil {
		t.Fatal("GrowView of a device that is no view succeeded")
	}
	if err := GrowView(v, 2<<20); err != nil {
		t.Fatal(err)
	}
	if v.Size() != 2<<20 {
		t.Fatalf("view size %d", v.Size())
	}
	got := make([]byte, len(old))
	if _, err := v.ReadAt(got, l.PayloadSize-4096); err != nil || !bytes.Equal(got, old) {
		t.Fatalf("data before the old end after growing: %v", err)
	}
	fresh := bytes.Repeat([]byte("new!"), 1024)
	if _, err := v.WriteAt(fresh, 2<<20-4096); err != nil {
		t.Fatalf("write in the grown tail: %v", err)
	}
	if _, err := v.ReadAt(got, 2<<20-4096); err != nil || !bytes.Equal(got, fresh) {
		t.Fatalf("read the grown tail: %v", err)
	}
}
