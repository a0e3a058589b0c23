// Package bytesize is the one parser and printer of byte counts for every
// flag of the ferry binary (--size, --hydration-rate, --region-size …).
package bytesize

import (
	"fmt"
	"math"
	"strings"
	"unicode"

	"github.com/dustin/go-humanize"
)

// Parse reads a positive byte count such as "4096", "512MiB", "1GiB", "1G"
// or "1.5GB". A bare unit letter (k, M, G, T, P, E) is binary, as ferry's
// flags always took it (1G = 1 GiB, so a volume stays a whole number of
// sectors); "iB" units are binary and "B" units decimal, as written.
func Parse(s string) (int64, error) {
	t := strings.TrimSpace(s)
	if n := len(t); n > 0 && strings.ContainsRune("kKmMgGtTpPeE", rune(t[n-1])) &&
		(n == 1 || !unicode.IsLetter(rune(t[n-2]))) {
		t += "iB"
	}
	v, err := humanize.ParseBytes(t)
	if err != nil {
		return 0, fmt.Errorf("size %q: give a positive byte count like 4096, 512MiB or 1G (bare K, M, G, T are binary): %w", s, err)
	}
	if v == 0 || v > math.MaxInt64 {
		return 0, fmt.Errorf("size %q: give a positive byte count below 8 EiB", s)
	}
	return int64(v), nil
}

// Format prints n with a binary unit, e.g. "1.0 GiB" or "512 B".
func Format(n int64) string {
	if n < 0 {
		return "-" + humanize.IBytes(uint64(-n))
	}
	return humanize.IBytes(uint64(n))
}
