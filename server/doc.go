// Package server is the ferry server: a raft voter (Node) applying commands
// to the replicated state machine (package fsm), the /v1 HTTP/JSON API over
// mTLS (StartServer), its Prometheus metrics, the certificate bootstrap of
// the development server (StartDev, EnsureCerts) and the leader's
// housekeeping. Clients use package api, which imports nothing from here.
//
// Refusals are fsm.Refusal values everywhere; StatusOf is the only mapping
// from a refusal's kind to an HTTP status.
package server
