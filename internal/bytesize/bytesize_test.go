package bytesize

import "testing"

func TestParse(t *testing.T) {
	for in, want := range map[string]int64{
		"4096":    4096,
		"1GiB":    1 << 30,
		"1G":      1 << 30,
		"1g":      1 << 30,
		"1GI":     1 << 30,
		"512MiB":  512 << 20,
		"100GiB":  100 << 30,
		"64M":     64 << 20,
		"4k":      4096,
		" 8K ":    8192,
		"2T":      2 << 40,
		"1GB":     1_000_000_000,
		"1.5GiB":  3 << 29,
		"100 MiB": 100 << 20,
	} {
		got, err := Parse(in)
		if err != nil || got != want {
			t.Errorf("Parse(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "G", "GiB", "-1G", "1X", "abc", "1GiBB", "99999999999999999999", "9EiB", "1 2G"} {
		if n, err := Parse(in); err == nil {
			t.Errorf("Parse(%q) = %d; want an error", in, n)
		}
	}
}

func TestFormat(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 512: "512 B", 1 << 30: "1.0 GiB", 3 << 29: "1.5 GiB", 64 << 20: "64 MiB"} {
		if got := Format(n); got != want {
			t.Errorf("Format(%d) = %q; want %q", n, got, want)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"4k", "1GiB", "1G", "-1", "kk", "1.5GB"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if n, err := Parse(s); err == nil && n <= 0 {
			t.Fatalf("Parse(%q) = %d", s, n)
		}
	})
}
