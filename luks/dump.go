package luks

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Dump is what `ferry luks dump` shows: the carried layout, the header
// fields `cryptsetup luksDump` prints, and which header copy was used. It
// holds no key material (salts and the digest are public header fields).
type Dump struct {
	Layout  *Layout         `json:"layout,omitempty"`
	Error   string          `json:"layout_error,omitempty"`
	Used    Copy            `json:"header_copy_used"`
	Damaged map[Copy]string `json:"damaged_copies,omitempty"`
	Header  *Header         `json:"header"`
}

// NewDump reads the header of a device and builds its dump. A header that
// parses but cannot give a layout (e.g. a reencryption in progress) still
// dumps, with the reason in Error.
func NewDump(r io.ReaderAt, size int64) (*Dump, error) {
	h, err := ReadHeader(r, size)
	if err != nil {
		return nil, err
	}
	d := &Dump{Used: h.Used, Damaged: h.Damaged, Header: h}
	if l, err := h.Layout(size); err != nil {
		d.Error = err.Error()
	} else {
		d.Layout = &l
	}
	return d, nil
}

// LuksDumpText renders the header the way `cryptsetup luksDump` (2.x) does,
// line for line, so the two can be compared directly. Tokens are listed by
// id and type only.
func (h *Header) LuksDumpText() string {
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	p("LUKS header information\n")
	p("Version:       \t%d\n", h.Version)
	p("Epoch:         \t%d\n", h.SeqID)
	p("Metadata area: \t%d [bytes]\n", h.MetadataSize)
	p("Keyslots area: \t%d [bytes]\n", h.Meta.Config.KeyslotsSize)
	p("UUID:          \t%s\n", esc(h.UUID))
	p("Label:         \t%s\n", orNone(esc(h.Label), "(no label)"))
	p("Subsystem:     \t%s\n", orNone(esc(h.Subsystem), "(no subsystem)"))
	flags := "(no flags)"
	if len(h.Meta.Config.Flags) > 0 {
		flags = escJoin(h.Meta.Config.Flags) + " "
	}
	p("Flags:       \t%s\n", flags)
	p("\nData segments:\n")
	for _, id := range sortedIDs(h.Meta.Segments) {
		s := h.Meta.Segments[id]
		p("  %s: %s\n", esc(id), esc(s.Type))
		p("\toffset: %d [bytes]\n", s.Offset)
		if s.SizeStr == "dynamic" {
			p("\tlength: (whole device)\n")
		} else {
			p("\tlength: %d [bytes]\n", s.Size)
		}
		if s.Type == "crypt" {
			p("\tcipher: %s\n", esc(s.Encryption))
			p("\tsector: %d [bytes]\n", s.SectorSize)
		}
		if len(s.Flags) > 0 {
			p("\tflags : %s\n", escJoin(s.Flags)+" ")
		}
	}
	p("\nKeyslots:\n")
	for _, id := range sortedIDs(h.Meta.Keyslots) {
		k := h.Meta.Keyslots[id]
		p("  %s: %s\n", esc(id), esc(k.Type))
		p("\tKey:        %d bits\n", 8*k.KeySize)
		prio := "normal"
		if k.Priority != nil {
			switch *k.Priority {
			case 0:
				prio = "ignored"
			case 1:
			case 2:
				prio = "preferred"
			default:
				prio = "invalid"
			}
		}
		p("\tPriority:   %s\n", prio)
		p("\tCipher:     %s\n", esc(k.Area.Encryption))
		p("\tCipher key: %d bits\n", 8*k.Area.KeySize)
		p("\tPBKDF:      %s\n", esc(k.KDF.Type))
		if k.KDF.Type == "pbkdf2" {
			p("\tHash:       %s\n", esc(k.KDF.Hash))
			p("\tIterations: %d\n", k.KDF.Iterations)
		} else {
			p("\tTime cost:  %d\n", k.KDF.Time)
			p("\tMemory:     %d\n", k.KDF.Memory)
			p("\tThreads:    %d\n", k.KDF.CPUs)
		}
		p("\tSalt:       %s", hexLines(k.KDF.Salt))
		p("\tAF stripes: %d\n", k.AF.Stripes)
		p("\tAF hash:    %s\n", esc(k.AF.Hash))
		p("\tArea offset:%d [bytes]\n", k.Area.Offset)
		p("\tArea length:%d [bytes]\n", k.Area.Size)
		for _, did := range sortedIDs(h.Meta.Digests) {
			if contains(h.Meta.Digests[did].Keyslots, id) {
				p("\tDigest ID:  %s\n", esc(did))
			}
		}
	}
	p("Tokens:\n")
	for _, id := range sortedIDs(h.Meta.Tokens) {
		typ := ""
		if m, ok := h.Meta.Tokens[id].(map[string]any); ok {
			typ, _ = m["type"].(string)
		}
		p("  %s: %s\n", esc(id), esc(typ))
	}
	p("Digests:\n")
	for _, id := range sortedIDs(h.Meta.Digests) {
		d := h.Meta.Digests[id]
		p("  %s: %s\n", esc(id), esc(d.Type))
		p("\tHash:       %s\n", esc(d.Hash))
		p("\tIterations: %d\n", d.Iterations)
		p("\tSalt:       %s", hexLines(d.Salt))
		p("\tDigest:     %s", hexLines(d.Digest))
	}
	return b.String()
}

// hexLines formats bytes like cryptsetup: 16 per line, continuation lines
// indented under the first.
func hexLines(b []byte) string {
	var s strings.Builder
	for i, c := range b {
		if i > 0 && i%16 == 0 {
			s.WriteString("\n\t            ")
		}
		fmt.Fprintf(&s, "%02x ", c)
	}
	s.WriteString("\n")
	return s.String()
}

func orNone(s, none string) string {
	if s == "" {
		return none
	}
	return s
}

// Text renders the dump for a terminal: the carried layout, the header copy
// in use, damaged copies, then LuksDumpText. Every string that comes from
// the header is escaped, so a hostile label cannot drive the terminal.
func (d *Dump) Text(device string) string {
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	p("Ferry layout of %s\n", esc(device))
	if l := d.Layout; l != nil {
		p("  uuid:          %s\n", esc(l.UUID))
		p("  data offset:   %d [bytes]\n", l.DataOffset)
		p("  metadata size: %d [bytes]\n", l.MetadataSize)
		p("  keyslots size: %d [bytes]\n", l.KeyslotsSize)
		p("  sector size:   %d [bytes]\n", l.SectorSize)
		p("  cipher:        %s\n", esc(l.Cipher))
		p("  key size:      %d bits\n", 8*l.KeyBytes)
		p("  payload size:  %d [bytes]\n", l.PayloadSize)
	} else {
		p("  no usable layout: %s\n", esc(d.Error))
	}
	p("  header copy:   %s\n", esc(string(d.Used)))
	copies := make([]string, 0, len(d.Damaged))
	for c := range d.Damaged {
		copies = append(copies, string(c))
	}
	sort.Strings(copies)
	for _, c := range copies {
		p("  damaged copy:  %s: %s\n", esc(c), esc(d.Damaged[Copy(c)]))
	}
	p("\n")
	b.WriteString(d.Header.LuksDumpText())
	return b.String()
}

// esc makes a header string safe to print: control characters (C0, DEL,
// C1 such as the 8-bit CSI), bidi overrides, other unprintable runes and
// invalid UTF-8 become Go-style escapes, and a backslash is doubled so an
// escape in the output always came from esc.
func esc(s string) string {
	clean := true
	for _, r := range s {
		if r == '\\' || r == utf8.RuneError || !unicode.IsPrint(r) && r != ' ' {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n <= 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case r == '\\':
			b.WriteString(`\\`)
		case r == ' ' || unicode.IsPrint(r) && r != utf8.RuneError:
			b.WriteRune(r)
		case r < 0x100:
			fmt.Fprintf(&b, `\x%02x`, r)
		default:
			fmt.Fprintf(&b, `\u%04x`, r)
		}
		i += n
	}
	return b.String()
}

func escJoin(list []string) string {
	out := make([]string, len(list))
	for i, s := range list {
		out[i] = esc(s)
	}
	return strings.Join(out, " ")
}

// EscapeJSONControls rewrites DEL and the C1 control characters inside
// encoded JSON as \u escapes: encoding/json escapes only C0, and a raw
// 8-bit CSI would reach the terminal of whoever prints the JSON. Both only
// occur inside strings, where the escape means the same character.
func EscapeJSONControls(js []byte) []byte {
	var b strings.Builder
	for i := 0; i < len(js); {
		r, n := utf8.DecodeRune(js[i:])
		if r == 0x7f || r >= 0x80 && r <= 0x9f || unicode.Is(unicode.Bidi_Control, r) {
			fmt.Fprintf(&b, `\u%04x`, r)
		} else {
			b.Write(js[i : i+n])
		}
		i += n
	}
	return []byte(b.String())
}
