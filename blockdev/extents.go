package blockdev

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// fsIocFiemap is FS_IOC_FIEMAP, _IOWR('f', 11, struct fiemap); x/sys/unix
// does not define it.
const fsIocFiemap = 0xC020660B

// fiemap is struct fiemap of linux/fiemap.h, without its extent array:
// asked for no extents, the kernel only counts them.
type fiemap struct {
	start, length                         uint64
	flags, mappedExtents, extentCount, _r uint32
}

// Extents counts the extents f's blocks lie in (FIEMAP, after writing back
// its dirty pages): how fragmented a volume file is. A file whose extents
// follow its offsets reads and writes in few, large pieces; on ext4 a
// direct write that spans extents also runs alone (docs/profiles.md).
func Extents(f *os.File) (int, error) {
	m := fiemap{length: ^uint64(0), flags: 1} // FIEMAP_FLAG_SYNC
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("extents of %s: %w", f.Name(), err)
	}
	var errno unix.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, fsIocFiemap, uintptr(unsafe.Pointer(&m)))
	}); err != nil {
		return 0, fmt.Errorf("extents of %s: %w", f.Name(), err)
	}
	if errno != 0 {
		return 0, fmt.Errorf("extents of %s (FIEMAP; the filesystem may not map its blocks): %w", f.Name(), errno)
	}
	return int(m.mappedExtents), nil
}

// Extents counts the extents the device's file lies in (see Extents).
func (d *File) Extents() (int, error) { return Extents(d.f) }
