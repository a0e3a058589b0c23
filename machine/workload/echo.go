package workload

import (
	"io"
	"net"
	"time"
)

// ServeEcho answers every connection accepted on ln with the bytes it
// sends, until ln is closed: how tests check that a machine answers on its
// 6PN address before and after a migration. A connection lives at most
// 30 s, so a peer that never closes cannot pin a goroutine.
func ServeEcho(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			_, _ = io.Copy(c, c)
		}()
	}
}
