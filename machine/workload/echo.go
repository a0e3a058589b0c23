package workload

import (
	"bufio"
	"io"
	"net"
	"time"
)

// WhoQuestion asks a machine's echo server which worker it runs on.
const WhoQuestion = "who?\n"

// ServeEcho answers every connection accepted on ln with the bytes it
// sends, until ln is closed: how tests check that a machine answers on its
// 6PN address before and after a migration. A connection lives at most
// 30 s, so a peer that never closes cannot pin a goroutine.
func ServeEcho(ln net.Listener) { ServeEchoWho(ln, "") }

// ServeEchoWho is ServeEcho that answers a connection opening with
// WhoQuestion with who (the worker the machine runs on) and closes it: an
// observer outside ferry asks this, many times a second, to see that a
// machine never answers from two workers at once. With who empty the
// question is echoed like any other bytes.
func ServeEchoWho(ln net.Listener, who string) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			if who == "" {
				_, _ = io.Copy(c, c)
				return
			}
			r := bufio.NewReader(c)
			line, err := r.ReadString('\n')
			if line == WhoQuestion {
				_, _ = io.WriteString(c, who+"\n")
				return
			}
			if _, werr := io.WriteString(c, line); werr != nil || err != nil {
				return
			}
			_, _ = io.Copy(c, r)
		}()
	}
}
