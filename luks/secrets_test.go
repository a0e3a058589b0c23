package luks

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
)

// Every way key material could leak — fmt verbs, JSON, text marshalling,
// zerolog fields, error messages of wrong keys and bad layouts, the dump in
// text and JSON — is collected and grepped for the volume key and the
// passphrase in hex (both cases) and base64 (all alphabets), and for any
// 8-byte window of them.
func TestNoKeyMaterialInOutput(t *testing.T) {
	path, keyFile, pass := formatVolume(t, 8<<20, FormatOptions{FastKDF: true, MetadataSize: 16384, KeyslotsSize: 4161536, SectorSize: 4096})
	f, err := blockdev.OpenFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	vk, err := Unlock(f, f.Size(), pass)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	log := zerolog.New(&out)

	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x", "%X", "%q", "%d", "%p"} {
		fmt.Fprintf(&out, verb+"\n", vk)
	}
	fmt.Fprintf(&out, "%v %+v\n", struct{ K *VolumeKey }{vk}, []*VolumeKey{vk})
	j, _ := json.Marshal(map[string]any{"key": vk})
	out.Write(j)
	txt, _ := vk.MarshalText()
	out.Write(txt)
	log.Info().Interface("key", vk).Stringer("key2", vk).Any("key3", vk).Msg("unlocked")

	// Errors on every path that handles the key or passphrase.
	if _, err := Unlock(f, f.Size(), append(bytes.Clone(pass), '!')); err == nil {
		t.Fatal("wrong passphrase unlocked")
	} else {
		fmt.Fprintln(&out, err)
		log.Error().Err(err).Msg("unlock")
	}
	h, err := ReadHeader(f, f.Size())
	if err != nil {
		t.Fatal(err)
	}
	l, _ := h.Layout(f.Size())
	short := NewVolumeKey(vk.Bytes()[:32])
	if _, err := OpenView(f, l, short); err != nil {
		fmt.Fprintln(&out, err)
	}
	bad := l
	bad.Cipher = "twofish-xts-plain64"
	if _, err := OpenView(f, bad, vk); err != nil {
		fmt.Fprintln(&out, err)
	}
	if _, _, err := OpenHeaderView(f, []byte("nope")); err != nil {
		fmt.Fprintln(&out, err)
	}
	v, _, err := OpenHeaderView(f, pass)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(&out, "%v %+v\n", v, v)
	v.Close()
	if _, err := v.ReadAt(make([]byte, 512), 0); err != nil {
		fmt.Fprintln(&out, err)
	}
	if err := Format(t.Context(), path+".missing-dir/x", keyFile, FormatOptions{FastKDF: true}); err != nil {
		fmt.Fprintln(&out, err)
	}
	d, err := NewDump(f, f.Size())
	if err != nil {
		t.Fatal(err)
	}
	dj, _ := json.Marshal(d)
	out.Write(dj)
	out.WriteString(h.LuksDumpText())

	all := out.String()
	if !strings.Contains(all, redacted) {
		t.Fatal("the redaction marker is missing: the test collected nothing")
	}
	for name, secret := range map[string][]byte{"volume key": vk.Bytes(), "passphrase": pass} {
		for _, enc := range encodings(secret) {
			if strings.Contains(all, enc) {
				t.Fatalf("%s appears in output as %q", name, enc)
			}
		}
		for i := 0; i+8 <= len(secret); i++ {
			w := secret[i : i+8]
			if strings.Contains(all, hex.EncodeToString(w)) || strings.Contains(all, string(w)) && isPrintable(w) {
				t.Fatalf("an 8-byte window of the %s appears in output", name)
			}
		}
	}
	if os.Getenv("FERRY_SHOW_SECRET_TEST_OUTPUT") != "" {
		t.Log(all)
	}
	vk.Wipe()
	if vk.Len() != 0 {
		t.Fatal("Wipe left the key")
	}
}

func encodings(b []byte) []string {
	return []string{
		hex.EncodeToString(b), strings.ToUpper(hex.EncodeToString(b)),
		base64.StdEncoding.EncodeToString(b), base64.RawStdEncoding.EncodeToString(b),
		base64.URLEncoding.EncodeToString(b), base64.RawURLEncoding.EncodeToString(b),
		fmt.Sprintf("% x", b), fmt.Sprint(b),
	}
}

func isPrintable(b []byte) bool {
	for _, c := range b {
		if c < 0x20 || c > 0x7e {
			return false
		}
	}
	return true
}
