// Package workload is the demo and test machine's workload: it appends
// checksummed, sequence-numbered records to a file on the machine's volume,
// makes each batch durable, and only then acknowledges the batch in an ack
// file outside the volume. Verify checks that every acknowledged record
// survived a migration — the "zero acknowledged records lost" invariant.
package workload

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// RecordSize is the fixed size of one record on disk.
const RecordSize = 64

// RecordsFile is the file the workload appends to inside the volume.
const RecordsFile = "records.log"

// record layout: seq(8) | unix nanos(8) | writer id(16) | sha256(seq..writer)(32).
func encode(seq uint64, t time.Time, writer string) []byte {
	b := make([]byte, RecordSize)
	binary.BigEndian.PutUint64(b[0:], seq)
	binary.BigEndian.PutUint64(b[8:], uint64(t.UnixNano()))
	copy(b[16:32], writer)
	sum := sha256.Sum256(b[:32])
	copy(b[32:], sum[:])
	return b
}

func decode(b []byte) (seq uint64, ok bool) {
	sum := sha256.Sum256(b[:32])
	if string(sum[:]) != string(b[32:64]) {
		return 0, false
	}
	return binary.BigEndian.Uint64(b[0:]), true
}

// Scan reads a records file and returns the number of valid records in
// sequence from 1, and the byte length they occupy. A torn or corrupt tail
// (a record written but never acknowledged) ends the scan; a record out of
// sequence is corruption and an error.
func Scan(path string) (count uint64, validLen int64, err error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, fmt.Errorf("open records %s: %w", path, err)
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 1<<20)
	buf := make([]byte, RecordSize)
	for {
		if _, err := io.ReadFull(r, buf); err != nil {
			return count, validLen, nil // EOF or torn tail
		}
		seq, ok := decode(buf)
		if !ok {
			return count, validLen, nil
		}
		if seq != count+1 {
			return count, validLen, fmt.Errorf("records %s: record %d has sequence %d: file is corrupt", path, count+1, seq)
		}
		count++
		validLen += RecordSize
	}
}

// Config of a running workload.
type Config struct {
	Dir      string        // the machine's volume mount point
	AckFile  string        // outside the volume: the highest durable sequence, appended per batch
	Writer   string        // a name recorded in each record (the worker it runs on)
	Interval time.Duration // between batches
	Batch    int           // records per batch
}

// Run appends records until ctx is cancelled. On start it resumes after the
// last valid record, truncating a torn tail (which was never acknowledged).
func Run(ctx context.Context, cfg Config) error {
	if cfg.Batch <= 0 {
		cfg.Batch = 8
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 5 * time.Millisecond
	}
	path := filepath.Join(cfg.Dir, RecordsFile)
	count, validLen, err := Scan(path)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("open records: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(validLen); err != nil {
		return fmt.Errorf("truncate torn tail of records: %w", err)
	}
	ack, err := os.OpenFile(cfg.AckFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open ack file: %w", err)
	}
	defer ack.Close()
	off := validLen
	seq := count
	tick := time.NewTicker(cfg.Interval)
	defer tick.Stop()
	// The first batch goes out at once: a machine starting on a migration's
	// target writes as soon as it runs, and the measured pause should not
	// include one tick of idling.
	for first := true; ; first = false {
		if !first {
			select {
			case <-ctx.Done():
				return nil
			case <-tick.C:
			}
		}
		batch := make([]byte, 0, cfg.Batch*RecordSize)
		for i := 0; i < cfg.Batch; i++ {
			batch = append(batch, encode(seq+uint64(i)+1, time.Now(), cfg.Writer)...)
		}
		if _, err := f.WriteAt(batch, off); err != nil {
			return fmt.Errorf("append records: %w", err)
		}
		if err := f.Sync(); err != nil {
			return fmt.Errorf("sync records: %w", err)
		}
		off += int64(len(batch))
		seq += uint64(cfg.Batch)
		// Acknowledge only after the records are durable.
		if _, err := fmt.Fprintf(ack, "%d\n", seq); err != nil {
			return fmt.Errorf("write ack: %w", err)
		}
		if err := ack.Sync(); err != nil {
			return fmt.Errorf("sync ack: %w", err)
		}
	}
}

// Acked returns the highest acknowledged sequence in an ack file.
func Acked(ackFile string) (uint64, error) {
	b, err := os.ReadFile(ackFile)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read ack file: %w", err)
	}
	var max uint64
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		n, err := strconv.ParseUint(line, 10, 64)
		if err != nil {
			continue // a torn last line was never acknowledged
		}
		if n > max {
			max = n
		}
	}
	return max, nil
}

// Verify checks that the records file in dir holds every record up to the
// highest acknowledged sequence. It returns (records present, acked).
func Verify(dir, ackFile string) (present, acked uint64, err error) {
	acked, err = Acked(ackFile)
	if err != nil {
		return 0, 0, err
	}
	present, _, err = Scan(filepath.Join(dir, RecordsFile))
	if err != nil {
		return present, acked, err
	}
	if present < acked {
		return present, acked, fmt.Errorf("lost acknowledged records: %d acknowledged, only %d present", acked, present)
	}
	return present, acked, nil
}
