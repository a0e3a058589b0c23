package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/internal/operator"
)

func init() { register(newKeysCmd()) }

func newKeysCmd() *cobra.Command {
	keys := &cobra.Command{Use: "keys", Short: "Key-encryption keys: the offline recovery key and the workers' public keys"}
	var out string
	var initJSON, showJSON bool
	initCmd := &cobra.Command{
		Use:   "recovery-init --out FILE",
		Short: "Make the cluster's recovery key pair: the public half goes to the servers, the private half to FILE (once)",
		Long: "Makes an HPKE key pair (ML-KEM-768 + X25519) on this machine, writes the private half to FILE\n" +
			"(mode 0600; an existing file is never replaced) and registers the public half with the cluster.\n" +
			"Every volume key is then also sealed to it, so `ferry volume recover` can open a volume whose\n" +
			"worker lost its own key. Keep FILE offline: it opens every volume. A cluster takes one recovery key.",
		Args: cobra.NoArgs,
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, _ []string) error {
			pub, err := operator.RecoveryInit(cmd.Context(), c, out)
			if err != nil {
				return withCode(exitCode(err), err)
			}
			if initJSON {
				return writeJSONOut(cmd.OutOrStdout(), map[string]string{"fingerprint": pub.Fingerprint, "private_key_file": out})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "recovery key %s registered; its private half is in %s (mode 0600): move it offline\n", pub.Fingerprint, out)
			return nil
		}),
	}
	initCmd.Flags().StringVar(&out, "out", "", "file to write the private recovery key to (must not exist)")
	initCmd.Flags().BoolVar(&initJSON, "json", false, "print the registered key's fingerprint and file as JSON")
	addClientFlags(initCmd)

	show := &cobra.Command{
		Use:   "show",
		Short: "Show the recovery key's and each worker's key fingerprint",
		Args:  cobra.NoArgs,
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, _ []string) error {
			ws, err := c.ListWorkers(cmd.Context())
			if err != nil {
				return err
			}
			rk, rerr := c.RecoveryKey(cmd.Context())
			if showJSON {
				out := map[string]string{}
				if rerr == nil {
					out["recovery"] = rk.Fingerprint
				}
				for _, w := range ws {
					if w.KEK != nil {
						out["worker "+w.Name] = w.KEK.Fingerprint
					}
				}
				return writeJSONOut(cmd.OutOrStdout(), out)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "HOLDER\tFINGERPRINT")
			if rerr == nil {
				fmt.Fprintf(tw, "recovery\t%s\n", rk.Fingerprint)
			} else {
				fmt.Fprintf(tw, "recovery\t(none: run `ferry keys recovery-init --out FILE`)\n")
			}
			for _, w := range ws {
				fp := "(none registered)"
				if w.KEK != nil {
					fp = w.KEK.Fingerprint
				}
				fmt.Fprintf(tw, "worker %s\t%s\n", w.Name, fp)
			}
			return tw.Flush()
		}),
	}
	show.Flags().BoolVar(&showJSON, "json", false, "print holder -> fingerprint as JSON")
	addClientFlags(show)
	keys.AddCommand(initCmd, show)
	return keys
}

func newVolumeRecoverCmd() *cobra.Command {
	var keyFile, to string
	var recJSON bool
	rec := &cobra.Command{
		Use:   "recover ID --recovery-key FILE [--to WORKER]",
		Short: "Open a volume's recovery envelope with the recovery key and seal its key to its worker again",
		Long: "Reads the volume's recovery envelope, opens it here with the private recovery key in FILE and\n" +
			"seals the key to the worker's registered key as the volume's new owner envelope (use it after a\n" +
			"worker lost its key file and registered a new key). The key is only in this process's memory;\n" +
			"the servers store the new envelope and cannot open it. --to must name the volume's worker.",
		Args: cobra.ExactArgs(1),
		RunE: apiRunE(func(cmd *cobra.Command, c *api.Client, args []string) error {
			if keyFile == "" {
				return withCode(ExitUsage, fmt.Errorf("--recovery-key FILE is required"))
			}
			env, err := operator.RecoverVolume(cmd.Context(), c, args[0], keyFile, to)
			if err != nil {
				return withCode(exitCode(err), err)
			}
			if recJSON {
				e := *env
				e.Ciphertext = nil
				return writeJSONOut(cmd.OutOrStdout(), e)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s: key sealed again to worker %s (key %s)\n", env.Volume, env.Recipient, env.Fingerprint)
			return nil
		}),
	}
	rec.Flags().StringVar(&keyFile, "recovery-key", "", "file holding the private recovery key (from `ferry keys recovery-init`)")
	rec.Flags().StringVar(&to, "to", "", "worker to seal the key to (default and only choice: the volume's worker)")
	rec.Flags().BoolVar(&recJSON, "json", false, "print the new owner envelope's record (without ciphertext) as JSON")
	addClientFlags(rec)
	return rec
}
