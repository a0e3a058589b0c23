package api

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/ferry-dev/ferry/fsm"
)

func reply(status int, body string) *http.Response {
	return &http.Response{StatusCode: status, Body: io.NopCloser(strings.NewReader(body))}
}

func TestDecodeReplyRefusal(t *testing.T) {
	err := DecodeReply(reply(409, `{"error":{"kind":"conflict","code":"wrong_state","reason":"no","state":"planned"}}`), nil)
	var e *Error
	if !errors.As(err, &e) || e.Kind != fsm.RefuseConflict || e.Code != fsm.CodeWrongState || e.State != fsm.Planned || retryable(err) {
		t.Fatalf("refusal: %#v", err)
	}
	// A body without a kind (an older server) is classified by its status.
	err = DecodeReply(reply(503, `{"error":{"code":"no_leader","reason":"retry"}}`), nil)
	if !errors.As(err, &e) || e.Kind != fsm.RefuseNotLeader || !retryable(err) {
		t.Fatalf("kindless: %#v", err)
	}
	// Not a ferry body (a proxy's page): classified by status, retried on 502.
	err = DecodeReply(reply(502, "bad gateway"), nil)
	if !errors.As(err, &e) || e.Kind != fsm.RefuseNotLeader || e.Code != "http_502" || !retryable(err) {
		t.Fatalf("gateway: %#v", err)
	}
	err = DecodeReply(reply(404, "nope"), nil)
	if !errors.As(err, &e) || e.Kind != fsm.RefuseNotFound || retryable(err) {
		t.Fatalf("plain 404: %#v", err)
	}
	var out struct{ A int }
	if err := DecodeReply(reply(200, `{"A":7}`), &out); err != nil || out.A != 7 {
		t.Fatalf("ok reply: %v %+v", err, out)
	}
	// An empty 200 (a handler that returned when its client's attempt
	// timed out, answering after all) is no answer: retried, not decoded
	// as a zero value.
	if err := DecodeReply(reply(200, ""), &out); !errors.Is(err, ErrUnavailable) || !retryable(err) {
		t.Fatalf("empty 200 with a reply expected: %v", err)
	}
	if err := DecodeReply(reply(200, ""), nil); err != nil {
		t.Fatalf("empty 200 with no reply expected: %v", err)
	}
}
