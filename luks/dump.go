package luks

import (
	"fmt"
	"io"
	"strings"
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
	p("UUID:          \t%s\n", h.UUID)
	p("Label:         \t%s\n", orNone(h.Label, "(no label)"))
	p("Subsystem:     \t%s\n", orNone(h.Subsystem, "(no subsystem)"))
	flags := "(no flags)"
	if len(h.Meta.Config.Flags) > 0 {
		flags = strings.Join(h.Meta.Config.Flags, " ") + " "
	}
	p("Flags:       \t%s\n", flags)
	p("\nData segments:\n")
	for _, id := range sortedIDs(h.Meta.Segments) {
		s := h.Meta.Segments[id]
		p("  %s: %s\n", id, s.Type)
		p("\toffset: %d [bytes]\n", s.Offset)
		if s.SizeStr == "dynamic" {
			p("\tlength: (whole device)\n")
		} else {
			p("\tlength: %d [bytes]\n", s.Size)
		}
		if s.Type == "crypt" {
			p("\tcipher: %s\n", s.Encryption)
			p("\tsector: %d [bytes]\n", s.SectorSize)
		}
		if len(s.Flags) > 0 {
			p("\tflags : %s\n", strings.Join(s.Flags, " ")+" ")
		}
	}
	p("\nKeyslots:\n")
	for _, id := range sortedIDs(h.Meta.Keyslots) {
		k := h.Meta.Keyslots[id]
		p("  %s: %s\n", id, k.Type)
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
		p("\tCipher:     %s\n", k.Area.Encryption)
		p("\tCipher key: %d bits\n", 8*k.Area.KeySize)
		p("\tPBKDF:      %s\n", k.KDF.Type)
		if k.KDF.Type == "pbkdf2" {
			p("\tHash:       %s\n", k.KDF.Hash)
			p("\tIterations: %d\n", k.KDF.Iterations)
		} else {
			p("\tTime cost:  %d\n", k.KDF.Time)
			p("\tMemory:     %d\n", k.KDF.Memory)
			p("\tThreads:    %d\n", k.KDF.CPUs)
		}
		p("\tSalt:       %s", hexLines(k.KDF.Salt))
		p("\tAF stripes: %d\n", k.AF.Stripes)
		p("\tAF hash:    %s\n", k.AF.Hash)
		p("\tArea offset:%d [bytes]\n", k.Area.Offset)
		p("\tArea length:%d [bytes]\n", k.Area.Size)
		for _, did := range sortedIDs(h.Meta.Digests) {
			if contains(h.Meta.Digests[did].Keyslots, id) {
				p("\tDigest ID:  %s\n", did)
			}
		}
	}
	p("Tokens:\n")
	for _, id := range sortedIDs(h.Meta.Tokens) {
		typ := ""
		if m, ok := h.Meta.Tokens[id].(map[string]any); ok {
			typ, _ = m["type"].(string)
		}
		p("  %s: %s\n", id, typ)
	}
	p("Digests:\n")
	for _, id := range sortedIDs(h.Meta.Digests) {
		d := h.Meta.Digests[id]
		p("  %s: %s\n", id, d.Type)
		p("\tHash:       %s\n", d.Hash)
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
