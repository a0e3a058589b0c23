package vm

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
)

// QEMU is the emulator binary the harness boots.
const QEMU = "qemu-system-x86_64"

// BootConfig says what to boot and what the guest sees of the host.
type BootConfig struct {
	Kernel  *Kernel
	Initrd  string
	Share   string        // host folder mounted at /host in the guest; must hold an executable run.sh
	Timeout time.Duration // whole run, boot to power-off; default 5 minutes
	Memory  int           // MiB; default 1024
	CPUs    int           // default 2
	Console io.Writer     // receives the guest's serial console as it comes (optional)
}

// Result is what one boot produced.
type Result struct {
	Accel      string        // kvm or tcg
	BootTime   time.Duration // qemu start to the guest's init reaching run.sh
	Total      time.Duration // qemu start to exit
	ExitCode   int           // qemu's: 1 = guest passed, 3 = guest failed
	GuestRC    int           // run.sh's exit code, -1 when no result line came
	Console    string        // the whole serial console
	qemuError  error
	guestSpoke bool
}

// Passed is true only when qemu left through the debug-exit port with the
// pass value and the guest printed its result line with rc=0: a panic or a
// plain poweroff exits 0, which is never a pass.
func (r *Result) Passed() bool { return r.ExitCode == 1 && r.GuestRC == 0 }

// Err explains a failed run in one message, with the console's last lines.
func (r *Result) Err() error {
	if r.Passed() {
		return nil
	}
	why := fmt.Sprintf("qemu exited %d, guest rc %d", r.ExitCode, r.GuestRC)
	switch {
	case r.GuestRC == -1 && r.ExitCode == 0:
		why += " (guest powered off or panicked without a result)"
	case r.GuestRC == -1:
		why += " (no result line: guest hung, was killed, or crashed)"
	}
	if r.qemuError != nil {
		why += ": " + r.qemuError.Error()
	}
	return fmt.Errorf("vm: guest failed: %s\n--- console tail ---\n%s", why, tail([]byte(r.Console)))
}

// KVMUsable reports whether /dev/kvm can be opened read-write.
func KVMUsable() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// Boot runs the guest to completion. The network is qemu's user-mode
// (slirp) stack: the host is 10.0.2.2, and the guest has no default route.
// A returned error means qemu could not be run at all; a guest failure is in
// the Result (see Result.Err).
func Boot(ctx context.Context, log zerolog.Logger, cfg BootConfig) (*Result, error) {
	if _, err := exec.LookPath(QEMU); err != nil {
		return nil, fmt.Errorf("vm: %s not found: apt-get install qemu-system-x86", QEMU)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Minute
	}
	if cfg.Memory == 0 {
		cfg.Memory = 1024
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = 2
	}
	if fi, err := os.Stat(cfg.Share + "/run.sh"); err != nil || fi.Mode()&0o111 == 0 {
		return nil, fmt.Errorf("vm: %s/run.sh must exist and be executable", cfg.Share)
	}
	cache := filepath.Dir(filepath.Dir(cfg.Initrd))
	broken := filepath.Join(cache, "kvm-broken")
	accel := os.Getenv("FERRY_VM_ACCEL")
	if accel == "" {
		accel = "tcg"
		if _, err := os.Stat(broken); err != nil && KVMUsable() {
			accel = "kvm"
		}
	}
	if accel != "kvm" {
		return bootOnce(ctx, log, cfg, accel, 0)
	}
	// Nested KVM can abort on MSRs or hang with no output (seen on
	// Firecracker hosts): give it a short window to say anything, then
	// remember it is broken on this machine and fall back to TCG.
	res, err := bootOnce(ctx, log, cfg, "kvm", 20*time.Second)
	if err == nil && res.guestSpoke {
		return res, nil
	}
	log.Warn().Err(err).Str("console", tail([]byte(res.consoleOrEmpty()))).Msg("KVM did not boot the guest; using TCG from now on (delete the kvm-broken file in the cache to retry)")
	_ = os.WriteFile(broken, []byte("KVM failed to boot the guest on this machine\n"), 0o644)
	return bootOnce(ctx, log, cfg, "tcg", 0)
}

func (r *Result) consoleOrEmpty() string {
	if r == nil {
		return ""
	}
	return r.Console
}

// errSilent means the guest printed nothing within the first-output window.
var errSilent = errors.New("vm: guest printed nothing")

func bootOnce(ctx context.Context, log zerolog.Logger, cfg BootConfig, accel string, firstOutput time.Duration) (*Result, error) {
	nb := make([]byte, 8)
	_, _ = rand.Read(nb)
	nonce := hex.EncodeToString(nb)
	res := &Result{Accel: accel, GuestRC: -1}
	cpu := "max" // exposes AES-NI under TCG too
	if accel == "kvm" {
		cpu = "host"
	}
	kernel := cfg.Kernel.Vmlinuz
	if cfg.Kernel.Vmlinux != "" {
		kernel = cfg.Kernel.Vmlinux // PVH entry: no firmware, no decompression
	}
	args := []string{
		"-machine", "pc,accel=" + accel, "-cpu", cpu,
		"-smp", fmt.Sprint(cfg.CPUs), "-m", fmt.Sprint(cfg.Memory),
		"-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
		"-kernel", kernel, "-initrd", cfg.Initrd,
		// cryptomgr.notests: the crypto self-tests cost ~2.5 s under TCG.
		"-append", "console=ttyS0 panic=-1 loglevel=4 cryptomgr.notests ferry.nonce=" + nonce,
		"-nic", "user,model=virtio-net-pci",
		"-virtfs", "local,path=" + cfg.Share + ",mount_tag=host0,security_model=none,id=host0",
		"-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, QEMU, args...)
	cmd.WaitDelay = 5 * time.Second
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = cmd.Stdout
	start := time.Now()
	log.Info().Str("accel", accel).Str("kernel", cfg.Kernel.ABI).Msg("booting guest")
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("vm: starting %s: %w", QEMU, err)
	}

	var console strings.Builder
	var mu sync.Mutex
	done := make(chan struct{})
	spoke := make(chan struct{})
	var silent atomic.Bool
	if firstOutput > 0 {
		timer := time.AfterFunc(firstOutput, func() {
			select {
			case <-spoke:
			default:
				silent.Store(true)
				cancel()
			}
		})
		defer timer.Stop()
	}
	go func() {
		defer close(done)
		first := true
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := strings.TrimRight(sc.Text(), "\r")
			if first && strings.TrimSpace(line) != "" && !strings.HasPrefix(line, "qemu-system") {
				first = false
				res.guestSpoke = true
				close(spoke)
			}
			mu.Lock()
			console.WriteString(line + "\n")
			mu.Unlock()
			if cfg.Console != nil {
				fmt.Fprintln(cfg.Console, line)
			}
			if rest, ok := strings.CutPrefix(line, "FERRY-VM-BOOTED "+nonce); ok {
				res.BootTime = time.Since(start)
				log.Info().Dur("boot", res.BootTime).Str("guest", strings.TrimSpace(rest)).Msg("guest booted")
			}
			if rest, ok := strings.CutPrefix(line, "FERRY-VM-RESULT "+nonce+" rc="); ok {
				fmt.Sscan(rest, &res.GuestRC)
			}
		}
	}()
	<-done
	werr := cmd.Wait()
	res.Total = time.Since(start)
	res.Console = console.String()
	var ee *exec.ExitError
	switch {
	case werr == nil:
		res.ExitCode = 0
	case errors.As(werr, &ee) && ee.Exited():
		res.ExitCode = ee.ExitCode()
	default:
		res.ExitCode = -1
		res.qemuError = werr
	}
	if silent.Load() {
		return res, errSilent
	}
	if ctx.Err() == context.DeadlineExceeded {
		res.qemuError = fmt.Errorf("timed out after %s", cfg.Timeout)
	}
	log.Info().Int("exit", res.ExitCode).Int("guest_rc", res.GuestRC).Dur("total", res.Total).Msg("guest done")
	return res, nil
}
