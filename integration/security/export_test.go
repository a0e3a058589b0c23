package security

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/iscsi/exporter"
)

// exportEnv is a source worker w-a exporting a volume file for migration
// mig1 to the target w-c with the agent's exporter; w-b is the attacker's
// worker of the same cluster. All three sit on 127.0.0.1, so the address
// check admits every one of them: only the certificate tells them apart.
type exportEnv struct {
	dir         string // the cluster's --tls-dir (w-a's, w-b's and w-c's certificates)
	portal, iqn string
	want        []byte
	log         zerolog.Logger
	exp         *exporter.Exporter
	foreign     string // a --tls-dir of another CA, holding its own "w-c"
}

func newExportEnv(t *testing.T) *exportEnv {
	t.Helper()
	testenv.Root(t, "the export child runs gotgt in a private network namespace")
	root := t.TempDir()
	e := &exportEnv{dir: filepath.Join(root, "tls"), foreign: filepath.Join(root, "foreign"),
		log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)}
	for ca, certs := range map[string]map[string]string{
		filepath.Join(root, "ca"):         {"w-a": tlsutil.KindWorker, "w-b": tlsutil.KindWorker, "w-c": tlsutil.KindWorker},
		filepath.Join(root, "foreign-ca"): {"w-c": tlsutil.KindWorker},
	} {
		if err := tlsutil.InitCA(ca); err != nil {
			t.Fatal(err)
		}
		dir := e.dir
		if filepath.Base(ca) == "foreign-ca" {
			dir = e.foreign
		}
		for name, kind := range certs {
			if _, err := tlsutil.Issue(ca, dir, name, kind, []string{"127.0.0.1"}, tlsutil.IssueOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	e.want = make([]byte, 4<<20)
	rand.Read(e.want)
	img := filepath.Join(root, "volume")
	if err := os.WriteFile(img, e.want, 0o600); err != nil {
		t.Fatal(err)
	}
	e.exp = &exporter.Exporter{Log: e.log, StateDir: filepath.Join(root, "exports"), Address: "127.0.0.1", Domain: "test.ferry",
		TLSDir: e.dir, Name: "w-a"}
	var err error
	if e.portal, e.iqn, err = e.exp.Export(context.Background(), "mig1", img, "w-c", "127.0.0.1"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.exp.Unexport(context.Background(), "mig1") })
	return e
}

// as is the initiator of worker name (certificate from dir) expecting the
// source w-a, through portal.
func (e *exportEnv) as(t *testing.T, dir, name, portal string) iscsi.InitiatorConfig {
	t.Helper()
	cfg := iscsi.InitiatorConfig{Portal: portal, IQN: e.iqn, Timeout: 3 * time.Second, Sessions: 1}
	if name != "" {
		tc, err := tlsutil.PeerClientConfig(dir, name, tlsutil.Identity{Name: "w-a", Kind: tlsutil.KindWorker})
		if err != nil {
			t.Fatal(err)
		}
		cfg.TLS = tc
	}
	return cfg
}

func (e *exportEnv) read(cfg iscsi.InitiatorConfig) ([]byte, error) {
	l, err := iscsi.Dial(context.Background(), e.log, cfg)
	if err != nil {
		return nil, err
	}
	defer l.Close()
	got := make([]byte, len(e.want))
	_, err = l.ReadAt(got, 0)
	return got, err
}

// Finding 10: the export is admitted by address only, with no integrity.
// Now its gate speaks mutual TLS and admits the migration's target alone.
func TestFinding10_ExportAdmitsOnlyTheTargetOverTLS(t *testing.T) {
	e := newExportEnv(t)
	got, err := e.read(e.as(t, e.dir, "w-c", e.portal))
	if err != nil {
		t.Fatalf("the target's certificate was refused: %v", err)
	}
	if !bytes.Equal(got, e.want) {
		t.Fatal("the target read other bytes than the volume's")
	}
	for what, cfg := range map[string]iscsi.InitiatorConfig{
		"plain iSCSI from the target's address":   e.as(t, "", "", e.portal),
		"another worker's certificate (w-b)":      e.as(t, e.dir, "w-b", e.portal),
		"the source's own certificate (w-a)":      e.as(t, e.dir, "w-a", e.portal),
		"a certificate named w-c from another CA": e.as(t, e.foreign, "w-c", e.portal),
	} {
		if _, err := e.read(cfg); err == nil {
			t.Errorf("%s: logged into the export", what)
		}
	}
	// A raw TCP client speaking iSCSI gets no byte back.
	c, err := net.DialTimeout("tcp", e.portal, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	login := make([]byte, 48)
	login[0] = 0x43 // Login Request, immediate
	_, _ = c.Write(login)
	if n, _ := c.Read(make([]byte, 512)); n > 0 {
		t.Errorf("a plain TCP client got %d bytes from the export", n)
	}
	// mTLS is the default: an exporter without a certificate refuses to serve.
	bare := &exporter.Exporter{Log: e.log, StateDir: t.TempDir(), Address: "127.0.0.1", Domain: "test.ferry"}
	if _, _, err := bare.Export(context.Background(), "mig2", filepath.Join(t.TempDir(), "x"), "w-c", "127.0.0.1"); err == nil {
		_ = bare.Unexport(context.Background(), "mig2")
		t.Fatal("an export without TLS was started by default")
	}
}

// Finding 10: an on-path writer could change what the target hydrates.
// With TLS every altered byte is a connection error, never altered data.
func TestFinding10_TamperOnTheWireIsDetected(t *testing.T) {
	e := newExportEnv(t)
	var flips atomic.Int64
	proxy := tamperingProxy(t, e.portal, 256<<10, &flips)
	got, err := e.read(e.as(t, e.dir, "w-c", proxy))
	if flips.Load() == 0 {
		t.Fatal("the proxy altered nothing: the test proves nothing")
	}
	if err == nil {
		t.Fatal("the target read through an altering proxy without an error")
	}
	// TLS caught it (the record's MAC), not some later check on the data.
	if !strings.Contains(err.Error(), "tls: ") {
		t.Fatalf("the read failed, but not on TLS's integrity check: %v", err)
	}
	_ = got // a failed read's buffer is never used as data
}

// tamperingProxy forwards to to, flipping one bit at offset flipAt of every
// connection's stream from the export (past the TLS handshake and login).
func tamperingProxy(t *testing.T, to string, flipAt int64, flips *atomic.Int64) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				s, err := net.Dial("tcp", to)
				if err != nil {
					return
				}
				defer s.Close()
				go func() { _, _ = io.Copy(s, c); s.Close() }()
				buf := make([]byte, 32<<10)
				var n int64
				for {
					k, err := s.Read(buf)
					if k > 0 {
						if flipAt >= n && flipAt < n+int64(k) {
							buf[flipAt-n] ^= 0x01
							flips.Add(1)
						}
						n += int64(k)
						if _, werr := c.Write(buf[:k]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}
