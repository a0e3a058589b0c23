//go:build !amd64

package luks

// useAsm is false: the AES-NI sector loop exists only for amd64.
const useAsm = false

type xtsSchedule struct{}

func newSchedule(key1, key2 []byte) *xtsSchedule { return nil }

func (s *xtsSchedule) cryptSectors(dst, src []byte, sector int, iv, step uint64, encrypt bool) {
	panic("luks: no assembly XTS on this architecture")
}
