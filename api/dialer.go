package api

import (
	"context"
	"net"
	"net/http"
)

// SetDialer replaces how the client opens connections, e.g. to dial from
// inside another network namespace (the demo and integration tests reach a
// server that lives in one). Each connect is bounded by DialTimeout.
func (c *Client) SetDialer(dial func(ctx context.Context, network, addr string) (net.Conn, error)) {
	if t, ok := c.hc.Transport.(*http.Transport); ok {
		t.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			ctx, cancel := context.WithTimeout(ctx, DialTimeout)
			defer cancel()
			return dial(ctx, network, addr)
		}
	}
}
