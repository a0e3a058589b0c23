package api

import (
	"context"
	"net/http"

	"github.com/ferry-dev/ferry/fsm"
)

// RevokeRequest is the body of POST /v1/certs/revoked (operators only).
type RevokeRequest struct {
	Serial string `json:"serial"` // hex, colons and case ignored
	Reason string `json:"reason,omitempty"`
}

// RevokeCert puts a certificate serial on the replicated deny list every
// server checks on every TLS connection (operators only). Revoking a serial
// twice is not an error.
func (c *Client) RevokeCert(ctx context.Context, serial, reason string) error {
	_, err := c.do(ctx, http.MethodPost, "/v1/certs/revoked", nil, RevokeRequest{Serial: serial, Reason: reason}, nil)
	return err
}

// RevokedCerts lists the deny list (operators and servers only).
func (c *Client) RevokedCerts(ctx context.Context) ([]fsm.RevokedCert, error) {
	var r []fsm.RevokedCert
	_, err := c.do(ctx, http.MethodGet, "/v1/certs/revoked", nil, nil, &r)
	return r, err
}

// RevokedSerials lists the revoked certificate serials (tlsutil.SerialString
// form), sorted, without who revoked them or why. Every identity may read
// it: workers check their export peers against it.
func (c *Client) RevokedSerials(ctx context.Context) ([]string, error) {
	var r []string
	_, err := c.do(ctx, http.MethodGet, "/v1/certs/revoked/serials", nil, nil, &r)
	return r, err
}
