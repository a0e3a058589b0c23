package iscsi

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/ferry-dev/ferry/internal/testenv"
)

func needTool(t testing.TB, name string) {
	t.Helper()
	testenv.Tools(t, "apt-get install libiscsi-bin", name)
}

func lunURL(e *Export) string { return fmt.Sprintf("iscsi://%s/%s/0", e.Portal(), e.IQN()) }

func TestLibiscsiToolsAgainstExport(t *testing.T) {
	needTool(t, "iscsi-inq")
	const size = 4 << 20
	image, _ := randomImage(t, size)
	e, _ := startTestExport(t, image, nil)

	out, err := exec.Command("iscsi-inq", lunURL(e)).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "DIRECT_ACCESS") {
		t.Fatalf("iscsi-inq: %v\n%s", err, out)
	}
	out, err = exec.Command("iscsi-readcapacity16", lunURL(e)).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Total size:"+strconv.Itoa(size)) {
		t.Fatalf("iscsi-readcapacity16 (want Total size:%d): %v\n%s", size, err, out)
	}
	// Discovery must announce the gate's portal, not gotgt's loopback inside the namespace.
	out, err = exec.Command("iscsi-ls", "-s", "iscsi://"+e.Portal()).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Target:"+e.IQN()+" Portal:"+e.Portal()) || !strings.Contains(string(out), "Lun:0") {
		t.Fatalf("iscsi-ls: %v\n%s", err, out)
	}
}

// The suites a read-only LUN must pass (issue 3), and ReadOnly, which with
// --dataloss tries writes and expects them refused as write-protected.
var complianceSuites = []string{
	"ALL.Read6", "ALL.Read10", "ALL.Read12", "ALL.Read16", "ALL.ReadCapacity10", "ALL.ReadCapacity16",
	"ALL.TestUnitReady", "ALL.Inquiry", "ALL.ModeSense6", "ALL.Verify10", "ALL.Verify16", "ALL.iSCSIcmdsn",
	"ALL.Prefetch10", "ALL.Prefetch16",
	"ALL.ReadOnly",
}

var cuSummary = regexp.MustCompile(`(?m)^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)`)

func TestLibiscsiComplianceSuites(t *testing.T) {
	needTool(t, "iscsi-test-cu")
	image, want := randomImage(t, 4<<20)
	e, _ := startTestExport(t, image, nil)
	for _, suite := range complianceSuites {
		t.Run(suite, func(t *testing.T) {
			out, err := exec.Command("iscsi-test-cu", "--dataloss", "--silent", "--test", suite, lunURL(e)).CombinedOutput()
			m := cuSummary.FindSubmatch(out)
			if err != nil || m == nil {
				t.Fatalf("iscsi-test-cu %s: %v\n%s", suite, err, out)
			}
			ran, failed := atoi(m[2]), atoi(m[4])
			if ran == 0 || failed != 0 {
				t.Fatalf("iscsi-test-cu %s: ran %d, failed %d\n%s", suite, ran, failed, out)
			}
		})
	}
	if got, _ := os.ReadFile(image); !bytes.Equal(got, want) {
		t.Fatal("the exported image changed under --dataloss tests")
	}
}

func atoi(b []byte) int { n, _ := strconv.Atoi(string(b)); return n }
