package main

// ferry clone: the userspace clone engine as a foreground process, for
// operators and tests. `create` runs the datapath's serve process on a local
// source with the engine exported raw as a FUSE file (optionally on a loop
// device); `status`, `enable-hydration`, `disable-hydration`,
// `set-tunables` and `remove` talk to its control socket like the agent
// does (HTTP over the unix socket).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/dmclone"
)

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
			st, err := cloneStatus(cmd.Context(), sock, meta)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(cloneStatusJSON(st))
			}
			printCloneStatus(cmd, st)
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
				if err := cloneOp(cmd.Context(), sock, meta, op, nil); err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), "ok")
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
			cur, err := cloneStatus(cmd.Context(), sock, meta)
			if err != nil {
				return err
			}
			if cur.Engine == nil {
				return withCode(ExitRefused, errors.New("the clone was dissolved: nothing hydrates any more"))
			}
			t := cur.Engine.Tunables
			f := cmd.Flags()
			if f.Changed("batch") {
				t.BatchRegions = tun.BatchRegions
			}
			if f.Changed("idle-batch") {
				t.IdleBatchRegions = tun.IdleBatchRegions
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
			if err := cloneOp(cmd.Context(), sock, meta, "set-tunables", &t); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "ok")
			return nil
		},
	}
	sockFlags(setTun)
	setTun.Flags().IntVar(&tun.BatchRegions, "batch", 0, "regions per background copy")
	setTun.Flags().IntVar(&tun.IdleBatchRegions, "idle-batch", 0, "regions per background copy while the machine does no I/O (0 = the batch)")
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

// dialClone finds the clone's process by --socket or --meta.
func dialClone(ctx context.Context, sock, meta string) (*userspace.Process, error) {
	if sock == "" {
		if meta == "" {
			return nil, withCode(ExitUsage, errors.New("give --socket or --meta to find the clone"))
		}
		sock = userspace.CloneSocket(meta)
	}
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	p, err := userspace.Dial(ctx, sock)
	if err != nil {
		return nil, fmt.Errorf("connect to clone at %s (is `ferry clone create` running?): %w", sock, err)
	}
	return p, nil
}

func cloneStatus(ctx context.Context, sock, meta string) (*userspace.ProcessStatus, error) {
	p, err := dialClone(ctx, sock, meta)
	if err != nil {
		return nil, err
	}
	return p.Detail(context.Background())
}

// cloneOp runs one control operation; a refusal exits with ExitRefused.
func cloneOp(ctx context.Context, sock, meta, op string, t *dmclone.Tunables) error {
	p, err := dialClone(ctx, sock, meta)
	if err != nil {
		return err
	}
	c := context.Background()
	switch op {
	case "enable-hydration":
		err = p.EnableHydration(c)
	case "disable-hydration":
		err = p.DisableHydration(c)
	case "set-tunables":
		err = p.SetTunables(c, t)
	case "remove":
		err = p.Stop(c)
	default:
		return withCode(ExitUsage, fmt.Errorf("unknown clone operation %q", op))
	}
	var ce *userspace.CallError
	if errors.As(err, &ce) && ce.Refused() {
		return withCode(ExitRefused, err)
	}
	return err
}

// cloneStatusJSON is the engine's progress record with where the clone is
// exported.
func cloneStatusJSON(st *userspace.ProcessStatus) any {
	var p dmclone.Progress
	if st.Engine != nil {
		p = *st.Engine
	}
	return struct {
		dmclone.Progress
		File      string `json:"file"`
		Loop      string `json:"loop,omitempty"`
		Dissolved bool   `json:"dissolved"`
	}{p, st.File, st.Loop, st.Dissolved}
}

func printCloneStatus(cmd *cobra.Command, st *userspace.ProcessStatus) {
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "file:       %s\n", st.File)
	if st.Loop != "" {
		fmt.Fprintf(w, "loop:       %s\n", st.Loop)
	}
	if st.Engine == nil {
		fmt.Fprintln(w, "no clone engine")
		return
	}
	p := st.Engine
	pct := 100 * float64(p.HydratedRegions) / float64(max(p.TotalRegions, 1))
	fmt.Fprintf(w, "hydrated:   %d/%d regions of %d bytes (%.1f%%)", p.HydratedRegions, p.TotalRegions, p.RegionSize, pct)
	if st.Dissolved {
		fmt.Fprint(w, ", dissolved into the destination")
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "fetched:    %d bytes; skipped: %d by discard, %d known-zero, %d overwritten\n",
		p.FetchedBytes, p.SkippedDiscardBytes, p.SkippedKnownZeroBytes, p.SkippedWriteBytes)
	state := "off"
	if p.HydrationEnabled {
		state = "on"
	}
	fmt.Fprintf(w, "hydration:  %s, %.1f MiB/s, ETA %v\n", state, p.RateBPS/(1<<20), p.ETA.Round(time.Second))
	if p.Stalled {
		fmt.Fprintf(w, "STALLED:    %s\n", p.StalledReason)
	}
}

func newCloneCreate() *cobra.Command {
	var (
		o                     userspace.CloneOptions
		regionSize, knownZero string
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
			if o.RegionSize, err = dmclone.ParseSize(regionSize); err != nil {
				return withCode(ExitUsage, err)
			}
			if knownZero != "holes" && knownZero != "none" {
				return withCode(ExitUsage, fmt.Errorf("--known-zero %q: use holes or none", knownZero))
			}
			o.KnownZeroHoles = knownZero == "holes"
			if _, err := o.Config(); err != nil {
				return withCode(ExitUsage, err)
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return userspace.ServeClone(ctx, log, o, func(r userspace.Ready) {
				b, _ := json.Marshal(struct {
					OK bool `json:"ok"`
					userspace.Ready
				}{true, r})
				fmt.Fprintln(cmd.OutOrStdout(), string(b))
			})
		},
	}
	f := c.Flags()
	f.StringVar(&o.Source, "source", "", "source device or image (opened read-only)")
	f.StringVar(&o.Dest, "dest", "", "destination device or file (created sparse at the source's size if missing)")
	f.StringVar(&o.Meta, "meta", "", "metadata (bitmap) file; reusing it resumes the clone")
	f.StringVar(&regionSize, "region-size", "4k", "region size, a power of two from 4k to 1g")
	f.StringVar(&o.MountDir, "mount-dir", "", "directory to mount the FUSE export on")
	f.StringVar(&o.FileName, "file-name", "disk", "name of the exported file inside --mount-dir")
	f.StringVar(&o.Socket, "socket", "", "control socket path (default <meta>.sock)")
	f.StringVar(&knownZero, "known-zero", "holes", "holes: regions in the source file's holes are hydrated without a fetch; none")
	f.BoolVar(&o.Loop, "loop", false, "attach the exported file to a loop device (direct I/O) and detach it on remove")
	f.BoolVar(&o.Hydrate, "hydrate", false, "enable background hydration at once")
	f.BoolVar(&o.Dissolve, "dissolve", true, "when fully hydrated, serve the destination alone (the export switches without the kernel noticing)")
	return c
}
