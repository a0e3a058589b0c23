package e2e

import (
	"io"
	"strconv"

	"bufio"
	"context"
	"errors"
	"fmt"
	"github.com/ferry-dev/ferry/internal/testbed"
	"net"
	"os/exec"
	"strings"
	"time"
)

// runCLI runs the ferry CLI as an operator from the control namespace.
func runCLI(ctx context.Context, e *env, args ...string) (string, error) {
	full := append([]string{"--net=/run/netns/" + e.bed.NSOf("ctl"), "--", ferryBin}, args...)
	full = append(full, "--server", e.bed.ServerAddr, "--tls-dir", e.bed.TLSDir(), "--cert", "operator")
	out, err := exec.CommandContext(ctx, "nsenter", full...).CombinedOutput()
	return string(out), err
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// echo checks a machine answers TCP echo at addr:7000, from the control namespace.
func echo(e *env, addr string) error {
	var last error
	for i := 0; i < 30; i++ {
		c, err := e.bed.DialIn("ctl")(e.ctx, "tcp", net.JoinHostPort(addr, "7000"))
		if err == nil {
			c.SetDeadline(time.Now().Add(3 * time.Second))
			fmt.Fprint(c, "hello\n")
			line, rerr := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if rerr == nil && strings.TrimSpace(line) == "hello" {
				return nil
			}
			err = fmt.Errorf("echo: %q %v", line, rerr)
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	return last
}

// metricsOf fetches a worker agent's /metrics from inside its namespace.
func metricsOf(e *env, worker string) (string, error) {
	c, err := e.bed.DialIn(worker)(e.ctx, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(testbed.MetricsPort)))
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprint(c, "GET /metrics HTTP/1.0\r\n\r\n")
	b, err := io.ReadAll(c)
	return string(b), err
}
