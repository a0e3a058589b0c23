package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/internal/logging"
	"github.com/ferry-dev/ferry/netrewrite"
)

// defaultDataDir is where an agent keeps its local state; netrewrite's
// mapping records live in <data-dir>/netrewrite/mappings.
const defaultDataDir = "/var/lib/ferry"

func mappingStore(dataDir string) netrewrite.Store {
	return netrewrite.Store{Dir: filepath.Join(dataDir, "netrewrite", "mappings")}
}

// parseID reads a 32-bit id in decimal or 0x-hex.
func parseID(name, s string) (uint32, error) {
	v, err := strconv.ParseUint(s, 0, 32)
	if err != nil {
		return 0, withCode(ExitUsage, fmt.Errorf("--%s %q: give a 32-bit id in decimal or 0x-hex", name, s))
	}
	return uint32(v), nil
}

type addrJSON struct {
	Addr    string `json:"addr"`
	Org     uint32 `json:"org"`
	Host    uint32 `json:"host"`
	Machine uint32 `json:"machine"`
}

func printAddr(cmd *cobra.Command, a netrewrite.Addr, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(cmd.OutOrStdout())
		return enc.Encode(addrJSON{a.String(), a.Org(), a.Host(), a.Machine()})
	}
	_, err := fmt.Fprintf(cmd.OutOrStdout(), "%s\torg=%#x host=%#x machine=%#x\n", a, a.Org(), a.Host(), a.Machine())
	return err
}

func newNetCmd() *cobra.Command {
	netCmd := &cobra.Command{
		Use:   "net",
		Short: "6PN addresses and the old->new address mappings of migrated machines",
	}
	netCmd.AddCommand(newNetAddrCmd(), newNetMappingsCmd(), newNetExpireCmd(), newNetStateCmd(), newNetFabricCmd(),
		newNetMachineCmd(), newNetStepCmd("cutover"), newNetStepCmd("rollback"))
	return netCmd
}

// newNetAddrCmd builds `ferry net addr build|parse`.
func newNetAddrCmd() *cobra.Command {
	var asJSON bool
	addrCmd := &cobra.Command{Use: "addr", Short: "Build and parse 6PN addresses (fdaa:ORG:HOST:MACHINE::)"}
	var org, host, machine string
	build := &cobra.Command{
		Use:   "build --org ID --host ID --machine ID",
		Short: "Print the 6PN address of a machine on a worker",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o, err := parseID("org", org)
			if err != nil {
				return err
			}
			h, err := parseID("host", host)
			if err != nil {
				return err
			}
			m, err := parseID("machine", machine)
			if err != nil {
				return err
			}
			a, err := netrewrite.Build(o, h, m)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			return printAddr(cmd, a, asJSON)
		},
	}
	build.Flags().StringVar(&org, "org", "", "org network id (32 bits)")
	build.Flags().StringVar(&host, "host", "", "worker host id (32 bits, from the registry)")
	build.Flags().StringVar(&machine, "machine", "", "machine id (32 bits)")
	for _, f := range []string{"org", "host", "machine"} {
		_ = build.MarkFlagRequired(f)
	}
	parse := &cobra.Command{
		Use:   "parse ADDR",
		Short: "Check a 6PN address and print its org, host and machine ids",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := netrewrite.Parse(args[0])
			if err != nil {
				return withCode(ExitUsage, err)
			}
			return printAddr(cmd, a, asJSON)
		},
	}
	addrCmd.PersistentFlags().BoolVar(&asJSON, "json", false, "print JSON")
	addrCmd.AddCommand(build, parse)
	return addrCmd
}

func newNetMappingsCmd() *cobra.Command {
	var dataDir string
	var namespaces []string
	var all, mapJSON bool
	mappings := &cobra.Command{
		Use:   "mappings",
		Short: "List live old->new address mappings (records in the data dir; with --ns, also the kernel's)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			recs, err := mappingStore(dataDir).List()
			if err != nil {
				return err
			}
			now := time.Now()
			var live []netrewrite.Mapping
			for _, m := range recs {
				if all || m.Live(now) {
					live = append(live, m)
				}
			}
			var kernel []netrewrite.KernelMapping
			for _, ns := range namespaces {
				if err := netrewrite.CheckPrivileges(); err != nil {
					return err
				}
				km, err := netrewrite.KernelMappings(cmd.Context(), ns)
				if err != nil {
					return err
				}
				kernel = append(kernel, km...)
			}
			out := cmd.OutOrStdout()
			if mapJSON {
				return json.NewEncoder(out).Encode(struct {
					Mappings []netrewrite.Mapping       `json:"mappings"`
					Kernel   []netrewrite.KernelMapping `json:"kernel,omitempty"`
				}{live, kernel})
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "MACHINE\tOLD\tNEW\tUNTIL\tLEFT")
			for _, m := range live {
				left := time.Until(m.Until).Truncate(time.Second)
				if left < 0 {
					left = 0
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", m.Machine, m.Old, m.New, m.Until.Format(time.RFC3339), left)
			}
			if len(namespaces) > 0 {
				fmt.Fprintln(tw, "\nNS\tOLD\tKIND\tTO")
				for _, k := range kernel {
					to := k.Dev
					if k.Via.IsValid() {
						to = "via " + k.Via.String() + " dev " + k.Dev
					}
					if k.New.IsValid() {
						to = "dnat " + k.New.String()
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", k.NS, k.Old, k.Kind, to)
				}
			}
			return tw.Flush()
		},
	}
	mappings.Flags().StringVar(&dataDir, "data-dir", defaultDataDir, "agent data directory")
	mappings.Flags().StringSliceVar(&namespaces, "ns", nil, "also list the mappings in these network namespaces' kernel state (\"\" = this one)")
	mappings.Flags().BoolVar(&all, "all", false, "include records whose grace period has ended but were not expired yet")
	mappings.Flags().BoolVar(&mapJSON, "json", false, "print JSON")
	return mappings
}

func newNetExpireCmd() *cobra.Command {
	var dataDir string
	expire := &cobra.Command{
		Use:   "expire",
		Short: "Remove the mappings whose grace period has ended (what the agent does on a timer)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := netLogger()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), time.Minute)
			defer cancel()
			done, err := mappingStore(dataDir).ExpireDue(ctx, log, time.Now())
			for _, m := range done {
				fmt.Fprintf(cmd.OutOrStdout(), "expired %s -> %s (%s)\n", m.Old, m.New, m.Machine)
			}
			return err
		},
	}
	expire.Flags().StringVar(&dataDir, "data-dir", defaultDataDir, "agent data directory")
	return expire
}

func newNetStateCmd() *cobra.Command {
	state := &cobra.Command{
		Use:   "state [NS]",
		Short: "Print a namespace's IPv6 addresses, routes and nft ruleset (the snapshot tests compare)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ns := ""
			if len(args) == 1 {
				ns = args[0]
			}
			s, err := netrewrite.KernelState(cmd.Context(), ns)
			if err != nil {
				return err
			}
			_, err = fmt.Fprint(cmd.OutOrStdout(), s)
			return err
		},
	}
	return state
}

// newNetFabricCmd builds `ferry net fabric up|down`: the private network
// between worker namespaces used by the demo and by hand-run tests.
func newNetFabricCmd() *cobra.Command {
	var bridgeNS, prefix string
	var members []string
	var orgs []string
	parse := func() (*netrewrite.Fabric, error) {
		p, err := netip.ParsePrefix(prefix)
		if err != nil {
			return nil, withCode(ExitUsage, fmt.Errorf("--prefix %q: give an IPv6 prefix such as fd00:fe::/64", prefix))
		}
		f := &netrewrite.Fabric{BridgeNS: bridgeNS, Prefix: p}
		for _, m := range members {
			fm, err := netrewrite.ParseFabricMember(m)
			if err != nil {
				return nil, withCode(ExitUsage, fmt.Errorf("--member: %w", err))
			}
			f.Members = append(f.Members, fm)
		}
		return f, nil
	}
	cmd := &cobra.Command{Use: "fabric", Short: "Connect worker namespaces by a private IPv6 fabric (demo and tests)"}
	up := &cobra.Command{
		Use: "up", Short: "Create or repair the fabric and route each org's worker prefixes (idempotent)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, err := parse()
			if err != nil {
				return err
			}
			log, err := netLogger()
			if err != nil {
				return err
			}
			if err := f.Connect(cmd.Context(), log); err != nil {
				return err
			}
			for _, o := range orgs {
				id, err := parseID("org", o)
				if err != nil {
					return err
				}
				if err := f.RouteOrg(cmd.Context(), log, id); err != nil {
					return err
				}
			}
			return nil
		},
	}
	up.Flags().StringSliceVar(&orgs, "org", nil, "org network ids to route between the workers")
	down := &cobra.Command{
		Use: "down", Short: "Remove the fabric (bridge namespace and member links; member namespaces stay)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, err := parse()
			if err != nil {
				return err
			}
			log, err := netLogger()
			if err != nil {
				return err
			}
			return f.Teardown(cmd.Context(), log)
		},
	}
	for _, c := range []*cobra.Command{up, down} {
		c.Flags().StringVar(&bridgeNS, "bridge-ns", "ferry-fabric", "namespace holding the fabric bridge")
		c.Flags().StringVar(&prefix, "prefix", "fd00:fe::/64", "fabric IPv6 prefix (private)")
		c.Flags().StringArrayVar(&members, "member", nil, "NS,HOSTID,FABRICADDR for each worker (HOSTID 0 for a plain peer)")
	}
	cmd.AddCommand(up, down)
	return cmd
}

// machineFlags are the flags that describe one machine's network.
type machineFlags struct {
	workerNS, machineNS, addr, veth, ifname string
}

func (f *machineFlags) add(cmd *cobra.Command, addrHelp string) {
	cmd.Flags().StringVar(&f.workerNS, "worker-ns", "", "worker network namespace (default: this one)")
	cmd.Flags().StringVar(&f.machineNS, "machine-ns", "", "machine network namespace")
	cmd.Flags().StringVar(&f.addr, "addr", "", addrHelp)
	cmd.Flags().StringVar(&f.veth, "veth", "", "worker-end veth name (default derived from org and machine id)")
	cmd.Flags().StringVar(&f.ifname, "if", "", "interface name inside the machine namespace (default eth0)")
	_ = cmd.MarkFlagRequired("machine-ns")
	_ = cmd.MarkFlagRequired("addr")
}

func (f *machineFlags) net() (netrewrite.MachineNet, error) {
	a, err := netrewrite.Parse(f.addr)
	if err != nil {
		return netrewrite.MachineNet{}, withCode(ExitUsage, fmt.Errorf("--addr: %w", err))
	}
	return netrewrite.MachineNet{WorkerNS: f.workerNS, MachineNS: f.machineNS, HostVeth: f.veth, MachineIf: f.ifname, Addr: a}, nil
}

func netLogger() (zerolog.Logger, error) {
	log, err := newLogger(false)
	if err != nil {
		return log, withCode(ExitUsage, err)
	}
	return logging.For(log, "netrewrite"), nil
}

func newNetMachineCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "machine", Short: "Set up or remove a machine's network namespace, veth, address and routes"}
	for _, up := range []bool{true, false} {
		var mf machineFlags
		use, short := "up", "Create or repair the machine's network (idempotent)"
		if !up {
			use, short = "down", "Remove the machine's veth, route and namespace (idempotent)"
		}
		sub := &cobra.Command{
			Use: use, Short: short, Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				m, err := mf.net()
				if err != nil {
					return err
				}
				log, err := netLogger()
				if err != nil {
					return err
				}
				if up {
					return netrewrite.SetupMachineNet(cmd.Context(), log, m)
				}
				return netrewrite.TeardownMachineNet(cmd.Context(), log, m)
			},
		}
		mf.add(sub, "the machine's 6PN address")
		cmd.AddCommand(sub)
	}
	return cmd
}

// newNetStepCmd builds `ferry net cutover|rollback target|source`.
func newNetStepCmd(step string) *cobra.Command {
	cmd := &cobra.Command{Use: step, Short: step + " the 6PN rewrite of a migrating machine on the target or the source worker"}
	if step == "cutover" {
		cmd.Short = "Apply the 6PN rewrite of a migrating machine on the target or the source worker (idempotent)"
	} else {
		cmd.Short = "Undo a cutover's 6PN rewrite before the point of no return (idempotent)"
	}

	var tf machineFlags
	var old, mode, dataDir, machine string
	var grace time.Duration
	target := &cobra.Command{
		Use: "target", Short: "Target side: machine network with the new address, old address mapped to it", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := tf.net()
			if err != nil {
				return err
			}
			o, err := netrewrite.Parse(old)
			if err != nil {
				return withCode(ExitUsage, fmt.Errorf("--old: %w", err))
			}
			log, err := netLogger()
			if err != nil {
				return err
			}
			plan := netrewrite.TargetPlan{Machine: m, Old: o, Mode: netrewrite.Mode(mode)}
			if step == "rollback" {
				return mappingStore(dataDir).RollbackTarget(cmd.Context(), log, plan)
			}
			err = mappingStore(dataDir).CutoverTarget(cmd.Context(), log, machine, plan, time.Now(), grace)
			if errors.Is(err, netrewrite.ErrBadAddr) {
				return withCode(ExitUsage, err)
			}
			return err
		},
	}
	tf.add(target, "the machine's NEW 6PN address (on the target)")
	target.Flags().StringVar(&old, "old", "", "the machine's old 6PN address (on the source)")
	target.Flags().StringVar(&mode, "mode", "alias", "how the old address keeps working: alias or nat")
	_ = target.MarkFlagRequired("old")

	var sf machineFlags
	var via, viaDev, newAddr string
	source := &cobra.Command{
		Use: "source", Short: "Source side: take the old address off the machine, route it to the target", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := sf.net()
			if err != nil {
				return err
			}
			v, err := netip.ParseAddr(via)
			if err != nil {
				return withCode(ExitUsage, fmt.Errorf("--via %q: give the target worker's fabric IPv6 address", via))
			}
			log, err := netLogger()
			if err != nil {
				return err
			}
			plan := netrewrite.SourcePlan{Machine: m, Via: v, ViaDev: viaDev}
			if step == "rollback" {
				return mappingStore(dataDir).RollbackSource(cmd.Context(), log, plan)
			}
			var n netrewrite.Addr
			if newAddr != "" {
				if n, err = netrewrite.Parse(newAddr); err != nil {
					return withCode(ExitUsage, fmt.Errorf("--new: %w", err))
				}
			}
			err = mappingStore(dataDir).CutoverSource(cmd.Context(), log, machine, plan, n, time.Now(), grace)
			if errors.Is(err, netrewrite.ErrBadAddr) {
				return withCode(ExitUsage, err)
			}
			return err
		},
	}
	sf.add(source, "the machine's OLD 6PN address (on the source)")
	source.Flags().StringVar(&via, "via", "", "the target worker's fabric address")
	source.Flags().StringVar(&viaDev, "via-dev", "", "interface towards the target (default fab0)")
	source.Flags().StringVar(&newAddr, "new", "", "the machine's new address, to record the mapping when no record exists yet")
	_ = source.MarkFlagRequired("via")

	for _, c := range []*cobra.Command{target, source} {
		c.Flags().StringVar(&dataDir, "data-dir", defaultDataDir, "agent data directory (mapping records)")
		if step == "cutover" {
			c.Flags().DurationVar(&grace, "grace", 0, "record the mapping with this grace period for `ferry net expire` (0: do not record)")
			c.Flags().StringVar(&machine, "machine", "", "machine name for the record")
		}
	}
	cmd.AddCommand(target, source)
	return cmd
}
