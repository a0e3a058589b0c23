package userspace

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/dmclone"
)

func testClone(t *testing.T, size int64) (*dmclone.Engine, []byte) {
	t.Helper()
	dir := t.TempDir()
	src := make([]byte, size)
	rand.Read(src)
	if err := os.WriteFile(filepath.Join(dir, "src"), src, 0o600); err != nil {
		t.Fatal(err)
	}
	sf, err := blockdev.OpenFile(filepath.Join(dir, "src"), true)
	if err != nil {
		t.Fatal(err)
	}
	df, err := blockdev.CreateSparse(filepath.Join(dir, "dst"), size)
	if err != nil {
		t.Fatal(err)
	}
	e, err := dmclone.Open(zerolog.Nop(), dmclone.Config{Source: sf, Dest: df, MetaPath: filepath.Join(dir, "meta"), RegionSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e, src
}

// The read-ahead goes through the clone's bookkeeping: what it read is
// hydrated (read again, nothing is fetched), and a region the machine
// wrote before is not fetched over.
func TestReadAheadHydratesAndKeepsLocalWrites(t *testing.T) {
	const size = 8 << 20
	e, src := testClone(t, size)
	rs := []blockdev.Range{{Off: 0, Len: 32 << 10}, {Off: 32 << 10, Len: 252 << 10}, {Off: 2 << 20, Len: 64 << 10}}
	mine := bytes.Repeat([]byte{0xAB}, 4096)
	if _, err := e.WriteAt(mine, 64<<10); err != nil { // inside the keyslot range
		t.Fatal(err)
	}
	n, err := readRanges(context.Background(), e, rs, 4, 16<<10)
	if err != nil {
		t.Fatal(err)
	}
	var want int64
	for _, r := range rs {
		want += r.Len
	}
	if n != want {
		t.Fatalf("read %d bytes, want %d", n, want)
	}
	before := e.Foreground()
	if before.Count == 0 {
		t.Fatal("the read-ahead fetched nothing")
	}
	for _, r := range rs {
		got := make([]byte, r.Len)
		if _, err := e.ReadAt(got, r.Off); err != nil {
			t.Fatal(err)
		}
		exp := src[r.Off:r.End()]
		if r.Off <= 64<<10 && 64<<10 < r.End() {
			exp = append([]byte(nil), exp...)
			copy(exp[64<<10-r.Off:], mine)
		}
		if !bytes.Equal(got, exp) {
			t.Fatalf("range %+v reads other bytes than the source's (and the local write)", r)
		}
	}
	if after := e.Foreground(); after.Count != before.Count {
		t.Fatalf("reading what was read ahead fetched %d more times", after.Count-before.Count)
	}
}

type failAt struct {
	blockdev.Device
	off   int64
	reads atomic.Int64
}

var errInjected = errors.New("injected")

func (f *failAt) ReadAt(p []byte, off int64) (int, error) {
	f.reads.Add(1)
	if off == f.off {
		return 0, errInjected
	}
	return len(p), nil
}

// A failing read stops the read-ahead with its error; a cancelled one
// stops too.
func TestReadRangesStops(t *testing.T) {
	dev := &failAt{off: 4 << 20}
	rs := []blockdev.Range{{Off: 0, Len: 64 << 20}}
	_, err := readRanges(context.Background(), dev, rs, 1, 1<<20)
	if !errors.Is(err, errInjected) {
		t.Fatalf("err %v, want the read's", err)
	}
	if r := dev.reads.Load(); r > 8 {
		t.Fatalf("%d reads after the failure at the 5th", r)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	dev = &failAt{off: -1}
	if _, err := readRanges(ctx, dev, rs, 2, 1<<20); !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", err)
	}
	if r := dev.reads.Load(); r != 0 {
		t.Fatalf("%d reads after cancel", r)
	}
}

// Stages run one after the other: a stage is listed only once the one
// before it was read, and a failed stage ends the run.
func TestPrefetchStagesRunInOrder(t *testing.T) {
	e, _ := testClone(t, 4<<20)
	var firstRead atomic.Bool
	var listedThird atomic.Bool
	p := newPrefetcher()
	var got []string
	p.run(e, func(what string, n int64, _ time.Duration, err error) {
		got = append(got, what)
		if what == "first" && err == nil {
			firstRead.Store(n == 64<<10)
		}
	},
		stage{"first", func() ([]blockdev.Range, error) { return []blockdev.Range{{Off: 0, Len: 64 << 10}}, nil }},
		stage{"second", func() ([]blockdev.Range, error) {
			if !firstRead.Load() {
				return nil, errors.New("listed before the first stage was read")
			}
			return nil, errors.New("the second stage fails")
		}},
		stage{"third", func() ([]blockdev.Range, error) { listedThird.Store(true); return nil, nil }},
	)
	p.wg.Wait()
	p.stop()
	if len(got) != 2 || got[0] != "first" || got[1] != "second" || listedThird.Load() {
		t.Fatalf("stages done %v (third listed %v); want first, second, and nothing after the failure", got, listedThird.Load())
	}
	if !firstRead.Load() {
		t.Fatal("the first stage had not read its ranges when the second was listed")
	}
}
