package main

// ferry clone: the userspace clone engine as a foreground process, for
// operators and tests. `create` opens the engine, exports it as a FUSE file
// (optionally attached to a loop device) and serves a control socket that
// `status`, `enable-hydration`, `disable-hydration`, `set-tunables` and
// `remove` talk to (one JSON request and one JSON reply per connection).

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/datapath/fuseexport"
	"github.com/ferry-dev/ferry/datapath/loopdev"
)

type cloneRequest struct {
	Op       string            `json:"op"`
	Tunables *dmclone.Tunables `json:"tunables,omitempty"`
}

type cloneReply struct {
	OK        bool              `json:"ok"`
	Error     string            `json:"error,omitempty"`
	Refused   bool              `json:"refused,omitempty"`
	File      string            `json:"file,omitempty"`
	Loop      string            `json:"loop,omitempty"`
	Socket    string            `json:"socket,omitempty"`
	Dissolved bool              `json:"dissolved"`
	Progress  *dmclone.Progress `json:"progress,omitempty"`
}

func init() {
	clone := &cobra.Command{
		Use:   "clone",
		Short: "Userspace clone device (dm-clone semantics) exported as a FUSE file for a loop device",
	}
	var sock, meta string
	sockFlags := func(c *cobra.Command) {
		c.Flags().StringVar(&sock, "socket", "", "control socket of the clone (default: <meta>.sock)")
		c.Flags().StringVar(&meta, "meta", "", "metadata file of the clone (locates the socket)")
	}
	var asJSON bool
	status := &cobra.Command{
		Use:   "status",
		Short: "Print hydration progress",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := cloneCall(sock, meta, cloneRequest{Op: "status"})
			if err != nil {
				return err
			}
			if asJSON {
				// The progress record, with where the clone is exported.
				out := struct {
					dmclone.Progress
					File      string `json:"file"`
					Loop      string `json:"loop,omitempty"`
					Dissolved bool   `json:"dissolved"`
				}{*r.Progress, r.File, r.Loop, r.Dissolved}
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(out)
			}
			printCloneStatus(cmd, r)
			return nil
		},
	}
	sockFlags(status)
	status.Flags().BoolVar(&asJSON, "json", false, "print the progress record as JSON")

	simple := func(use, short, op string) *cobra.Command {
		c := &cobra.Command{
			Use:   use,
			Short: short,
			Args:  cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				r, err := cloneCall(sock, meta, cloneRequest{Op: op})
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), "ok")
				_ = r
				return nil
			},
		}
		sockFlags(c)
		return c
	}
	var tun dmclone.Tunables
	setTun := &cobra.Command{
		Use:   "set-tunables",
		Short: "Change background hydration batch size, parallelism, rate limit and minimum share",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cur, err := cloneCall(sock, meta, cloneRequest{Op: "status"})
			if err != nil {
				return err
			}
			t := cur.Progress.Tunables
			f := cmd.Flags()
			if f.Changed("batch") {
				t.BatchRegions = tun.BatchRegions
			}
			if f.Changed("in-flight") {
				t.InFlight = tun.InFlight
			}
			if f.Changed("rate") {
				t.RateLimitBytesPerSec = tun.RateLimitBytesPerSec
			}
			if f.Changed("min-share") {
				t.MinShare = tun.MinShare
			}
			if _, err := cloneCall(sock, meta, cloneRequest{Op: "set-tunables", Tunables: &t}); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "ok")
			return nil
		},
	}
	sockFlags(setTun)
	setTun.Flags().IntVar(&tun.BatchRegions, "batch", 0, "regions per background copy")
	setTun.Flags().IntVar(&tun.InFlight, "in-flight", 0, "background copies at once")
	setTun.Flags().Int64Var(&tun.RateLimitBytesPerSec, "rate", 0, "background bytes per second (0 = unlimited)")
	setTun.Flags().Float64Var(&tun.MinShare, "min-share", 0, "fraction of in-flight copies kept while the workload reads the source")

	clone.AddCommand(newCloneCreate(), status,
		simple("enable-hydration", "Start background hydration", "enable-hydration"),
		simple("disable-hydration", "Stop background hydration (I/O still hydrates on demand)", "disable-hydration"),
		setTun,
		simple("remove", "Stop the clone process: detach its loop device, unmount, commit and close (refused while something else uses the file)", "remove"))
	register(clone)
}

func cloneSocketPath(sock, meta string) (string, error) {
	if sock != "" {
		return sock, nil
	}
	if meta == "" {
		return "", withCode(ExitUsage, errors.New("give --socket or --meta to find the clone"))
	}
	return meta + ".sock", nil
}

func cloneCall(sock, meta string, req cloneRequest) (*cloneReply, error) {
	path, err := cloneSocketPath(sock, meta)
	if err != nil {
		return nil, err
	}
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("connect to clone at %s (is `ferry clone create` running?): %w", path, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return nil, fmt.Errorf("send to %s: %w", path, err)
	}
	var r cloneReply
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&r); err != nil {
		return nil, fmt.Errorf("read reply from %s: %w", path, err)
	}
	if !r.OK {
		code := ExitFailed
		if r.Refused {
			code = ExitRefused
		}
		return &r, withCode(code, errors.New(r.Error))
	}
	return &r, nil
}

func printCloneStatus(cmd *cobra.Command, r *cloneReply) {
	w := cmd.OutOrStdout()
	p := r.Progress
	pct := 100 * float64(p.HydratedRegions) / float64(max(p.TotalRegions, 1))
	fmt.Fprintf(w, "file:       %s\n", r.File)
	if r.Loop != "" {
		fmt.Fprintf(w, "loop:       %s\n", r.Loop)
	}
	fmt.Fprintf(w, "hydrated:   %d/%d regions of %d bytes (%.1f%%)", p.HydratedRegions, p.TotalRegions, p.RegionSize, pct)
	if r.Dissolved {
		fmt.Fprint(w, ", dissolved into the destination")
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "fetched:    %d bytes; skipped: %d by discard, %d known-zero, %d overwritten\n",
		p.BytesFetched, p.BytesSkippedDiscard, p.BytesSkippedZero, p.BytesSkippedWrite)
	state := "off"
	if p.HydrationEnabled {
		state = "on"
	}
	fmt.Fprintf(w, "hydration:  %s, %.1f MiB/s, ETA %v\n", state, p.RateBytesPerSec/(1<<20), p.ETA.Round(time.Second))
	if p.Stalled {
		fmt.Fprintf(w, "STALLED:    %s\n", p.StallReason)
	}
}

func newCloneCreate() *cobra.Command {
	var (
		source, dest, meta, mountDir, fileName, sock, regionSize, knownZero string
		attachLoop, hydrate, dissolve                                       bool
	)
	c := &cobra.Command{
		Use:   "create",
		Short: "Run a clone in the foreground: engine + FUSE export (+ loop device) + control socket",
		Long: `Opens (or resumes) a clone of --source onto --dest with its bitmap in --meta,
exports it as <mount-dir>/<file-name>, optionally attaches it to a loop device
(--loop, with direct I/O), and serves a control socket until SIGTERM/SIGINT or
` + "`ferry clone remove`" + `. Prints one JSON line with the file, loop device and socket
once ready. Hydration starts off (dm-clone's no_hydration) unless --hydrate.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(true)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			if source == "" || dest == "" || meta == "" || mountDir == "" {
				return withCode(ExitUsage, errors.New("--source, --dest, --meta and --mount-dir are required"))
			}
			rs, err := dmclone.ParseSize(regionSize)
			if err == nil {
				err = dmclone.ValidateRegionSize(rs)
			}
			if err != nil {
				return withCode(ExitUsage, err)
			}
			if knownZero != "holes" && knownZero != "none" {
				return withCode(ExitUsage, fmt.Errorf("--known-zero %q: use holes or none", knownZero))
			}
			if sock == "" {
				sock = meta + ".sock"
			}
			r := &cloneRunner{log: log, sock: sock, done: make(chan struct{})}
			return r.run(cmd, source, dest, meta, mountDir, fileName, rs, knownZero == "holes", attachLoop, hydrate, dissolve)
		},
	}
	f := c.Flags()
	f.StringVar(&source, "source", "", "source device or image (opened read-only)")
	f.StringVar(&dest, "dest", "", "destination device or file (created sparse at the source's size if missing)")
	f.StringVar(&meta, "meta", "", "metadata (bitmap) file; reusing it resumes the clone")
	f.StringVar(&regionSize, "region-size", "4k", "region size, a power of two from 4k to 1g")
	f.StringVar(&mountDir, "mount-dir", "", "directory to mount the FUSE export on")
	f.StringVar(&fileName, "file-name", "disk", "name of the exported file inside --mount-dir")
	f.StringVar(&sock, "socket", "", "control socket path (default <meta>.sock)")
	f.StringVar(&knownZero, "known-zero", "holes", "holes: regions in the source file's holes are hydrated without a fetch; none")
	f.BoolVar(&attachLoop, "loop", false, "attach the exported file to a loop device (direct I/O) and detach it on remove")
	f.BoolVar(&hydrate, "hydrate", false, "enable background hydration at once")
	f.BoolVar(&dissolve, "dissolve", true, "when fully hydrated, serve the destination alone (the export switches without the kernel noticing)")
	return c
}

type cloneRunner struct {
	log       zerolog.Logger
	sock      string
	eng       *dmclone.Engine
	exp       *fuseexport.Export
	mu        sync.Mutex
	loop      string
	dissolved bool
	dst       blockdev.Device // the destination, once dissolved
	done      chan struct{}
	doneOnce  sync.Once
}

func (r *cloneRunner) run(cmd *cobra.Command, source, dest, meta, mountDir, fileName string, rs int64, holes, attach, hydrate, dissolve bool) error {
	src, err := blockdev.OpenFile(source, true)
	if err != nil {
		return err
	}
	var kz []blockdev.Range
	if holes {
		if st, err := os.Stat(source); err == nil && st.Mode().IsRegular() {
			f, err := os.Open(source)
			if err == nil {
				kz, err = blockdev.Holes(f)
				f.Close()
			}
			if err != nil {
				src.Close()
				return fmt.Errorf("find holes in %s (use --known-zero none to skip): %w", source, err)
			}
		}
	}
	var dst *blockdev.File
	if st, err := os.Stat(dest); err == nil && !st.Mode().IsRegular() {
		dst, err = blockdev.OpenFile(dest, false)
		if err != nil {
			src.Close()
			return err
		}
	} else {
		dst, err = blockdev.CreateSparse(dest, src.Size())
		if err != nil {
			src.Close()
			return err
		}
	}
	eng, err := dmclone.Open(r.log, dmclone.Config{Source: src, Dest: dst, MetaPath: meta, RegionSize: rs, KnownZero: kz})
	if err != nil {
		src.Close()
		dst.Close()
		return err
	}
	r.eng = eng
	exp, err := fuseexport.Mount(r.log, mountDir, fileName, eng)
	if err != nil {
		eng.Close()
		return err
	}
	r.exp = exp
	if attach {
		dev, err := loopdev.Attach(exp.Path(), true)
		if err != nil {
			exp.Close()
			eng.Close()
			return err
		}
		r.loop = dev
	}
	os.Remove(r.sock)
	ln, err := net.Listen("unix", r.sock)
	if err != nil {
		r.shutdown()
		return fmt.Errorf("listen on control socket %s: %w", r.sock, err)
	}
	defer os.Remove(r.sock)
	defer ln.Close()
	os.Chmod(r.sock, 0o600)
	if hydrate {
		eng.EnableHydration()
	}
	ready, _ := json.Marshal(cloneReply{OK: true, File: exp.Path(), Loop: r.loop, Socket: r.sock})
	fmt.Fprintln(cmd.OutOrStdout(), string(ready))

	go r.serve(ln)
	if dissolve {
		go func() {
			select {
			case <-eng.Done():
				r.dissolve()
			case <-r.done:
			}
		}()
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	for {
		select {
		case s := <-sig:
			r.log.Info().Str("signal", s.String()).Msg("stopping clone")
			if err := r.shutdown(); err != nil {
				r.log.Error().Err(err).Msg("stop refused; still serving")
				continue
			}
			return nil
		case <-r.done:
			return nil
		}
	}
}

func (r *cloneRunner) dissolve() {
	d, err := r.eng.Dissolve()
	if err != nil {
		r.log.Error().Err(err).Msg("dissolve")
		return
	}
	if _, err := r.exp.Swap(d); err != nil {
		r.log.Error().Err(err).Msg("swap export to the destination")
		return
	}
	r.mu.Lock()
	r.dissolved, r.dst = true, d
	r.mu.Unlock()
}

// shutdown detaches our loop device, unmounts and closes the engine. It
// refuses (and changes nothing) while something else still holds the file.
func (r *cloneRunner) shutdown() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.loop != "" {
		if err := loopdev.Detach(r.loop); err != nil {
			return fmt.Errorf("detach %s (unmount its filesystem first): %w", r.loop, err)
		}
		r.loop = ""
	}
	if err := r.exp.Close(); err != nil {
		return err
	}
	err := r.eng.Close()
	if r.dst != nil { // ours after dissolving; the engine left it open
		if cerr := r.dst.Close(); err == nil {
			err = cerr
		}
	}
	return err
}

func (r *cloneRunner) serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go r.handle(c)
	}
}

func (r *cloneRunner) handle(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	var req cloneRequest
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&req); err != nil {
		json.NewEncoder(c).Encode(cloneReply{Error: "bad request: " + err.Error()})
		return
	}
	reply := cloneReply{OK: true}
	var err error
	switch strings.ToLower(req.Op) {
	case "status":
	case "enable-hydration":
		err = r.eng.EnableHydration()
	case "disable-hydration":
		err = r.eng.DisableHydration()
	case "set-tunables":
		if req.Tunables == nil {
			err = errors.New("set-tunables needs tunables")
		} else {
			err = r.eng.SetTunables(*req.Tunables)
		}
	case "remove":
		if err = r.shutdown(); err != nil {
			reply.Refused = true
		}
	default:
		err = fmt.Errorf("unknown op %q", req.Op)
	}
	if err != nil {
		reply.OK, reply.Error = false, err.Error()
	}
	p := r.eng.Progress()
	r.mu.Lock()
	reply.Progress, reply.File, reply.Loop, reply.Socket, reply.Dissolved = &p, r.exp.Path(), r.loop, r.sock, r.dissolved
	r.mu.Unlock()
	json.NewEncoder(c).Encode(reply)
	if req.Op == "remove" && reply.OK {
		r.doneOnce.Do(func() { close(r.done) }) // after the reply is out
	}
}
