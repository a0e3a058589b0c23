package workload

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestRunResumeVerify(t *testing.T) {
	dir := t.TempDir()
	ack := filepath.Join(t.TempDir(), "ack")
	run := func(d time.Duration) {
		ctx, cancel := context.WithTimeout(context.Background(), d)
		defer cancel()
		if err := Run(ctx, Config{Dir: dir, AckFile: ack, Writer: "w", Interval: time.Millisecond, Batch: 4}); err != nil {
			t.Fatal(err)
		}
	}
	run(50 * time.Millisecond)
	p1, a1, err := Verify(dir, ack)
	if err != nil || a1 == 0 || p1 < a1 {
		t.Fatalf("first run: present %d acked %d err %v", p1, a1, err)
	}
	// A torn, unacknowledged tail is dropped on resume.
	f, _ := os.OpenFile(filepath.Join(dir, RecordsFile), os.O_WRONLY|os.O_APPEND, 0)
	f.Write([]byte("torn"))
	f.Close()
	run(50 * time.Millisecond)
	p2, a2, err := Verify(dir, ack)
	if err != nil || a2 <= a1 || p2 < a2 {
		t.Fatalf("second run: present %d acked %d err %v", p2, a2, err)
	}
}

func TestVerifyDetectsLoss(t *testing.T) {
	dir := t.TempDir()
	ack := filepath.Join(t.TempDir(), "ack")
	// One batch of four is written whatever the host's speed (the first
	// goes out at once): cancelled before Run starts, it writes just that.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Run(ctx, Config{Dir: dir, AckFile: ack, Interval: time.Millisecond, Batch: 4}); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, RecordsFile)
	st, _ := os.Stat(path)
	if err := os.Truncate(path, st.Size()-2*RecordSize); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Verify(dir, ack); err == nil {
		t.Fatal("Verify accepted a records file missing acknowledged records")
	}
	// Corruption in the middle is a gap: the scan stops there and Verify fails.
	b, _ := os.ReadFile(path)
	b[RecordSize+3] ^= 0xff
	os.WriteFile(path, b, 0o644)
	if n, _, _ := Scan(path); n != 1 {
		t.Fatalf("scan of file corrupt in record 2 counted %d valid records, want 1", n)
	}
}
