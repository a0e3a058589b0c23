package dmclone

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseSize reads a byte count such as "4096", "4k", "4KiB", "1M" or "1g"
// (binary multiples), as the CLI's --region-size takes it.
func ParseSize(s string) (int64, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "ib"), "b")
	shift := 0
	if t != "" {
		switch t[len(t)-1] {
		case 'k':
			shift = 10
		case 'm':
			shift = 20
		case 'g':
			shift = 30
		case 't':
			shift = 40
		}
		if shift != 0 {
			t = t[:len(t)-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > (1<<62)>>shift {
		return 0, fmt.Errorf("size %q: give a byte count like 4096, 4k or 1M", s)
	}
	return n << shift, nil
}
