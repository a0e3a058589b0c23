package console

import (
	"crypto/subtle"
	"net"
	"net/http"
	"strconv"
	"strings"
)

// allowedHosts are the Host header values the console answers to: the
// loopback names at its port, the listen address itself and any extra
// names. A page reached under another name was reached through DNS
// rebinding (an attacker's name pointing at 127.0.0.1), which would let
// that site read the pages and the CSRF token.
func allowedHosts(listen net.Addr, extra []string) map[string]bool {
	hosts := map[string]bool{}
	port := ""
	if listen != nil {
		if h, p, err := net.SplitHostPort(listen.String()); err == nil {
			port = p
			if ip := net.ParseIP(h); ip == nil || !ip.IsUnspecified() {
				hosts[strings.ToLower(listen.String())] = true
			}
		}
	}
	if port != "" {
		for _, h := range []string{"127.0.0.1", "localhost", "[::1]"} {
			hosts[h+":"+port] = true
			if port == "80" { // browsers leave the default port out of Host
				hosts[h] = true
			}
		}
	}
	for _, h := range extra {
		h = strings.ToLower(strings.TrimSpace(h))
		if h == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(h); err != nil && port != "" {
			if port == "80" {
				hosts[h] = true
			}
			h = net.JoinHostPort(strings.Trim(h, "[]"), port)
		}
		hosts[h] = true
	}
	return hosts
}

// guard wraps every request: Host check, security headers, and for any
// method but GET/HEAD the Origin and token checks.
func guard(next http.Handler, hosts map[string]bool, token string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		// No framing (a framed confirmation form could be clicked through),
		// no inline script or style, nothing cached, no referrer leaving.
		h.Set("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
		h.Set("X-Frame-Options", "DENY")
		h.Set("X-Content-Type-Options", "nosniff")
		// same-origin, not no-referrer: under no-referrer the browser sends
		// "Origin: null" with our own forms, which the Origin check refuses.
		h.Set("Referrer-Policy", "same-origin")
		h.Set("Cache-Control", "no-store")
		if !hosts[strings.ToLower(r.Host)] {
			http.Error(w, "this console answers only to its own address (Host "+strconv.Quote(r.Host)+" refused); open it at the address `ferry ui` printed",
				http.StatusMisdirectedRequest)
			return
		}
		if r.Method == http.MethodGet || r.Method == http.MethodHead {
			next.ServeHTTP(w, r)
			return
		}
		// Browsers send Origin with every POST; a request without one, or
		// from another site, did not come from one of our forms.
		if o := r.Header.Get("Origin"); o != "http://"+r.Host {
			http.Error(w, "cross-origin request refused (Origin "+strconv.Quote(o)+"): submit the form from the console's own page", http.StatusForbidden)
			return
		}
		if s := r.Header.Get("Sec-Fetch-Site"); s != "" && s != "same-origin" {
			http.Error(w, "cross-site request refused (Sec-Fetch-Site "+strconv.Quote(s)+")", http.StatusForbidden)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
		if err := r.ParseForm(); err != nil {
			http.Error(w, "bad form: "+err.Error(), http.StatusBadRequest)
			return
		}
		if subtle.ConstantTimeCompare([]byte(r.PostForm.Get("csrf")), []byte(token)) != 1 {
			http.Error(w, "missing or stale form token: reload the page and submit again", http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
}
