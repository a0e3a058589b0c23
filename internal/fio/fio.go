// Package fio runs the fio workloads ferry's benchmarks compare a
// machine's volume with a plain host file by, and reads fio's JSON output.
package fio

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strconv"
	"time"
)

// Job is one fio workload.
type Job struct {
	Name  string
	RW    string // randread, randwrite, read, write
	BS    string // 4k, 1m
	Depth int
	P50   bool // compare the median completion latency, not the throughput
}

// Jobs are the rows the data-path goals name.
var Jobs = []Job{
	{"4k randread QD32", "randread", "4k", 32, false},
	{"4k randwrite QD32", "randwrite", "4k", 32, false},
	{"1 MiB read QD8", "read", "1m", 8, false},
	{"1 MiB write QD8", "write", "1m", 8, false},
	{"4k randread QD1, p50 latency", "randread", "4k", 1, true},
}

// Side is the part of one direction of fio's JSON output the benchmarks read.
type Side struct {
	TotalIOs float64 `json:"total_ios"`
	IOPS     float64 `json:"iops"`
	BWBytes  float64 `json:"bw_bytes"`
	ClatNS   struct {
		Percentile map[string]float64 `json:"percentile"`
	} `json:"clat_ns"`
}

// Value is what a row compares: IOPS (4k), MB/s (1 MiB) or the p50 in µs.
func (j Job) Value(s Side) float64 {
	switch {
	case j.P50:
		return s.ClatNS.Percentile["50.000000"] / 1e3
	case j.BS == "4k":
		return s.IOPS
	default:
		return s.BWBytes / 1e6
	}
}

// Unit names Value's unit.
func (j Job) Unit() string {
	switch {
	case j.P50:
		return "µs"
	case j.BS == "4k":
		return "IOPS"
	default:
		return "MB/s"
	}
}

// Run runs j on path (a file or a block device) with O_DIRECT and libaio
// over its first size bytes for runFor, and returns the side j measures.
func Run(ctx context.Context, path string, size int64, j Job, runFor time.Duration) (Side, error) {
	out, err := exec.CommandContext(ctx, "fio", "--name=bench", "--filename="+path, "--direct=1", "--ioengine=libaio",
		"--rw="+j.RW, "--bs="+j.BS, "--iodepth="+strconv.Itoa(j.Depth), "--size="+strconv.FormatInt(size, 10),
		"--time_based", "--runtime="+strconv.Itoa(int(runFor.Seconds())),
		"--randrepeat=0", "--norandommap", "--output-format=json").Output()
	if err != nil {
		return Side{}, fmt.Errorf("fio %s on %s: %w: %s", j.Name, path, err, out)
	}
	var r struct {
		Jobs []struct {
			Read  Side `json:"read"`
			Write Side `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(out, &r); err != nil || len(r.Jobs) != 1 {
		return Side{}, fmt.Errorf("fio %s on %s: unreadable output (%v): %s", j.Name, path, err, out)
	}
	s := r.Jobs[0].Write
	if j.RW == "read" || j.RW == "randread" {
		s = r.Jobs[0].Read
	}
	if s.TotalIOs == 0 {
		return Side{}, fmt.Errorf("fio %s on %s completed no I/O", j.Name, path)
	}
	return s, nil
}
