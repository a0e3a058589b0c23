package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"text/tabwriter"
	"time"

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

	expire := &cobra.Command{
		Use:   "expire",
		Short: "Remove the mappings whose grace period has ended (what the agent does on a timer)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(false)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), time.Minute)
			defer cancel()
			done, err := mappingStore(dataDir).ExpireDue(ctx, logging.For(log, "netrewrite"), time.Now())
			for _, m := range done {
				fmt.Fprintf(cmd.OutOrStdout(), "expired %s -> %s (%s)\n", m.Old, m.New, m.Machine)
			}
			return err
		},
	}
	expire.Flags().StringVar(&dataDir, "data-dir", defaultDataDir, "agent data directory")

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

	netCmd.AddCommand(addrCmd, mappings, expire, state)
	return netCmd
}

func init() { register(newNetCmd()) }
