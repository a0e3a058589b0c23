package iscsi

import (
	"fmt"
	"strings"
	"time"
)

// MigrationIQN names the export of one migration:
// iqn.YYYY-MM.<domain>:ferry:<migration id> (RFC 7143 §4.2.7.4). The domain
// is written as given (e.g. "dev.ferry", already reversed); the id is
// lower-cased and characters an IQN may not hold become '-'.
func MigrationIQN(domain, migrationID string, t time.Time) string {
	clean := func(s string) string {
		return strings.Map(func(r rune) rune {
			switch {
			case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-', r == '.':
				return r
			case r >= 'A' && r <= 'Z':
				return r + 'a' - 'A'
			}
			return '-'
		}, s)
	}
	return fmt.Sprintf("iqn.%s.%s:ferry:%s", t.UTC().Format("2006-01"), clean(domain), clean(migrationID))
}

// validIQN accepts what RFC 3720/7143 allows for iqn. names, loosely.
func validIQN(s string) error {
	if len(s) > 223 || !strings.HasPrefix(s, "iqn.") || len(s) < len("iqn.2006-01.x") {
		return fmt.Errorf("IQN %q: want iqn.YYYY-MM.reversed.domain[:name], at most 223 bytes", truncate(s, 64))
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '.' || r == ':') {
			return fmt.Errorf("IQN %q: only lower-case letters, digits, '-', '.' and ':' are allowed", truncate(s, 64))
		}
	}
	return nil
}
