package fio

import "testing"

func TestValueAndUnit(t *testing.T) {
	var s Side
	s.IOPS, s.BWBytes = 1000, 5e8
	s.ClatNS.Percentile = map[string]float64{"50.000000": 42000}
	for _, c := range []struct {
		j    Job
		v    float64
		unit string
	}{
		{Jobs[0], 1000, "IOPS"}, {Jobs[2], 500, "MB/s"}, {Jobs[4], 42, "µs"},
	} {
		if got := c.j.Value(s); got != c.v || c.j.Unit() != c.unit {
			t.Errorf("%s: %v %s, want %v %s", c.j.Name, got, c.j.Unit(), c.v, c.unit)
		}
	}
}
