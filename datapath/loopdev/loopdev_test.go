package loopdev

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/ferry-dev/ferry/internal/testenv"
)

func TestAttachFindDetach(t *testing.T) {
	testenv.Root(t, "loop devices")
	testenv.Tools(t, "apt-get install util-linux", "losetup")
	path := filepath.Join(t.TempDir(), "backing")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	dev, err := Attach(path, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Detach(dev) })
	found, err := FindByBackingFile(path)
	if err != nil || !slices.Equal(found, []string{dev}) {
		t.Fatalf("FindByBackingFile = %v, %v; want [%s]", found, err, dev)
	}
	info, err := Info(dev)
	if err != nil || info.BackFile != path || info.DirectIO {
		t.Fatalf("Info = %+v, %v", info, err)
	}
	if err := Detach(dev); err != nil {
		t.Fatal(err)
	}
	if err := Detach(dev); err != nil {
		t.Fatalf("second detach: %v, want nil (idempotent)", err)
	}
	if found, _ := FindByBackingFile(path); len(found) != 0 {
		t.Fatalf("still attached after detach: %v", found)
	}
	if err := Detach("/etc/passwd"); err == nil {
		t.Fatal("detach of a non-loop path accepted")
	}
	if _, err := Attach(filepath.Join(t.TempDir(), "missing"), false); err == nil {
		t.Fatal("attach of a missing file accepted")
	}
}

func TestParseList(t *testing.T) {
	out := []byte(`{"loopdevices": [
	  {"name":"/dev/loop3", "back-file":"/x/disk (deleted)", "dio":true, "ro":false, "sizelimit":0},
	  {"name":"/dev/loop4", "back-file":"/y", "dio":"1", "ro":"0", "sizelimit":"10"}]}`)
	devs, err := parseList(out)
	if err != nil || len(devs) != 2 {
		t.Fatalf("parseList: %v %v", devs, err)
	}
	if !devs[0].DirectIO || devs[0].ReadOnly || !devs[1].DirectIO || devs[1].SizeLimit != 10 {
		t.Fatalf("parsed %+v", devs)
	}
	if _, err := parseList([]byte(`{"loopdevices":[{"back-file":"/z"}]}`)); err == nil {
		t.Fatal("device without a name accepted")
	}
	if _, err := parseList([]byte(`{`)); err == nil {
		t.Fatal("garbage accepted")
	}
}

func FuzzParseList(f *testing.F) {
	f.Add([]byte(`{"loopdevices":[{"name":"/dev/loop0","back-file":"/a","dio":1,"ro":0,"sizelimit":0}]}`))
	f.Add([]byte(`{"loopdevices":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		parseList(b)
	})
}

// listSysfs reads what losetup --list reads: only devices with a bound
// file, their backing file (deleted ones keep the kernel's suffix), direct
// I/O, read-only and size limit.
func TestListSysfs(t *testing.T) {
	root := t.TempDir()
	write := func(rel, content string) {
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("loop3/loop/backing_file", "/x/disk (deleted)\n")
	write("loop3/loop/dio", "1\n")
	write("loop3/loop/sizelimit", "0\n")
	write("loop3/ro", "0\n")
	write("loop4/loop/backing_file", "/y\n")
	write("loop4/loop/dio", "0\n")
	write("loop4/loop/sizelimit", "10\n")
	write("loop4/ro", "1\n")
	write("loop5/ro", "0\n") // no file bound
	write("vda/ro", "0\n")   // not a loop device
	devs, err := listSysfs(root)
	if err != nil {
		t.Fatal(err)
	}
	want := []Device{{Name: "/dev/loop3", BackFile: "/x/disk (deleted)", DirectIO: true},
		{Name: "/dev/loop4", BackFile: "/y", ReadOnly: true, SizeLimit: 10}}
	if len(devs) != len(want) || devs[0] != want[0] || devs[1] != want[1] {
		t.Fatalf("listed %+v, want %+v", devs, want)
	}
	if _, err := listSysfs(filepath.Join(root, "missing")); err == nil {
		t.Fatal("a missing sysfs directory listed without an error")
	}
}

// A device attached with direct I/O reads the backing file's bytes and
// reports direct I/O; detaching frees it.
func TestAttachDirectIO(t *testing.T) {
	testenv.Root(t, "loop devices")
	path := filepath.Join(t.TempDir(), "backing")
	want := make([]byte, 1<<20)
	for i := range want {
		want[i] = byte(i * 7)
	}
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	dev, err := Attach(path, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Detach(dev) })
	info, err := Info(dev)
	if err != nil || info.BackFile != path || !info.DirectIO || info.ReadOnly {
		t.Fatalf("Info = %+v, %v; want %s read-write with direct I/O", info, err, path)
	}
	got, err := os.ReadFile(dev)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("the loop device reads %d bytes that differ from its backing file", len(got))
	}
	if err := Detach(dev); err != nil {
		t.Fatal(err)
	}
	if found, _ := FindByBackingFile(path); len(found) != 0 {
		t.Fatalf("still attached after detach: %v", found)
	}
}
