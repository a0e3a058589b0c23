package iscsi

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/gostor/gotgt/pkg/api"
	"github.com/gostor/gotgt/pkg/scsi"
)

// errReadOnlyExport is what the store answers any write or unmap with; gotgt
// turns it into a check condition.
var errReadOnlyExport = errors.New("ferry export is read-only")

// roStore is ferry's gotgt backing store: positioned reads of a file or
// block device opened read-only, exact size, every modification refused.
type roStore struct {
	scsi.BaseBackingStore
	f *os.File
}

func (s *roStore) Open(_ *api.SCSILu, path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("opening the exported volume: %w", err)
	}
	size, err := f.Seek(0, io.SeekEnd) // works for files and block devices alike
	if err != nil {
		f.Close()
		return fmt.Errorf("sizing the exported volume: %w", err)
	}
	s.f, s.DataSize = f, uint64(size)
	return nil
}

func (s *roStore) Close(*api.SCSILu) error        { return s.f.Close() }
func (s *roStore) Init(*api.SCSILu, string) error { return nil }
func (s *roStore) Exit(*api.SCSILu) error         { return nil }
func (s *roStore) Size(*api.SCSILu) uint64        { return s.DataSize }

func (s *roStore) Read(off, n int64) ([]byte, error) {
	if off < 0 || n < 0 || uint64(off+n) > s.DataSize {
		return nil, fmt.Errorf("read of %d bytes at %d outside the %d-byte volume", n, off, s.DataSize)
	}
	b := make([]byte, n)
	if _, err := s.f.ReadAt(b, off); err != nil {
		return nil, err
	}
	return b, nil
}

func (s *roStore) Write([]byte, int64) error              { return errReadOnlyExport }
func (s *roStore) DataSync(int64, int64) error            { return nil }
func (s *roStore) DataAdvise(int64, int64, uint32) error  { return nil }
func (s *roStore) Unmap([]api.UnmapBlockDescriptor) error { return errReadOnlyExport }
