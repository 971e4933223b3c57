package alertroute

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/internal/config"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Headers of a webhook request. The body is the protobuf JSON of the
// vigil.v1.AlertEvent (proto field names), the same bytes on every attempt.
const (
	// HeaderSignature is "sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>",
	// sent when the route has a secret.
	HeaderSignature = "X-Vigil-Signature"
	// HeaderTimestamp is the attempt's Unix time in seconds; it is part of
	// the signed string, so a receiver that refuses old timestamps refuses
	// replayed requests.
	HeaderTimestamp = "X-Vigil-Timestamp"
	// HeaderIdempotencyKey is the event_id: the same on every attempt and
	// every redelivery, so a receiver de-duplicates on it.
	HeaderIdempotencyKey = "Idempotency-Key"
	// HeaderEventType is the event's type label (raised, acknowledged...).
	HeaderEventType = "X-Vigil-Event-Type"
	// HeaderAttempt is the attempt number, from 1.
	HeaderAttempt = "X-Vigil-Attempt"
)

// Sign returns the X-Vigil-Signature value of body sent at timestamp (the
// X-Vigil-Timestamp value).
func Sign(secret []byte, timestamp string, body []byte) string {
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(timestamp))
	mac.Write([]byte{'.'})
	mac.Write(body)
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

// ErrBadSignature is returned by Verify when the signature does not match.
var ErrBadSignature = errors.New("webhook signature does not match")

// Verify is what a receiver does with a request: it checks that signature
// (the X-Vigil-Signature header) is the HMAC-SHA256 of timestamp (the
// X-Vigil-Timestamp header) + "." + the exact body bytes under secret, in
// constant time, and that timestamp is within tolerance of now (refusing
// replays of old requests). Receivers then de-duplicate on the
// Idempotency-Key header (the event_id), as delivery is at-least-once.
func Verify(secret []byte, timestamp, signature string, body []byte, now time.Time, tolerance time.Duration) error {
	ts, err := strconv.ParseInt(timestamp, 10, 64)
	if err != nil {
		return fmt.Errorf("parsing %s %q: %w", HeaderTimestamp, timestamp, err)
	}
	if d := now.Sub(time.Unix(ts, 0)); d > tolerance || d < -tolerance {
		return fmt.Errorf("webhook timestamp %s is %s from now, beyond %s: %w", time.Unix(ts, 0).UTC().Format(time.RFC3339), d.Round(time.Second), tolerance, ErrBadSignature)
	}
	if !hmac.Equal([]byte(Sign(secret, timestamp, body)), []byte(signature)) {
		return ErrBadSignature
	}
	return nil
}

// route is one webhook: its filter, its bounded queue and its workers.
type route struct {
	cfg      config.AlertWebhook
	types    map[vigilv1.AlertEventType]bool
	minSev   int
	rules    map[string]bool
	wards    map[string]bool
	secret   []byte
	timeout  time.Duration
	queue    chan *job
	workers  chan struct{} // closed when every worker returned
	requests *http.Client
}

// job is one event to deliver on one route.
type job struct {
	p    *pending
	ev   *vigilv1.AlertEvent
	body []byte // shared by every route's job of the event; read-only
	read time.Time
}

func severityRank(s string) int {
	switch s {
	case "low":
		return 1
	case "medium":
		return 2
	case "high":
		return 3
	}
	return 0
}

func newRoute(w config.AlertWebhook, rc config.AlertsRoutes, client *http.Client) *route {
	r := &route{cfg: w, minSev: severityRank(w.MinSeverity), secret: []byte(w.Secret), timeout: w.Timeout,
		queue: make(chan *job, rc.QueueSize), workers: make(chan struct{}), requests: client}
	if r.timeout == 0 {
		r.timeout = rc.Timeout
	}
	set := func(xs []string) map[string]bool {
		if len(xs) == 0 {
			return nil
		}
		m := make(map[string]bool, len(xs))
		for _, x := range xs {
			m[x] = true
		}
		return m
	}
	r.rules, r.wards = set(w.Rules), set(w.Wards)
	if len(w.Events) > 0 {
		r.types = map[vigilv1.AlertEventType]bool{}
		for t := range vigilv1.AlertEventType_name {
			if slices.Contains(w.Events, vigilv1.AlertEventType(t).Label()) {
				r.types[vigilv1.AlertEventType(t)] = true
			}
		}
	}
	return r
}

// takes reports whether the route's filter selects ev.
func (r *route) takes(ev *vigilv1.AlertEvent) bool {
	switch {
	case r.types != nil && !r.types[ev.GetType()],
		r.minSev > 0 && severityRank(ev.GetSeverity()) < r.minSev,
		r.rules != nil && !r.rules[ev.GetRule()],
		r.wards != nil && !r.wards[ev.GetWard()]:
		return false
	}
	return true
}

// attemptError is a failed attempt: its HTTP status (0 when none came
// back) and whether another attempt may succeed.
type attemptError struct {
	status     int
	retriable  bool
	retryAfter time.Duration
	err        error
}

func (e *attemptError) Error() string {
	if e.status != 0 {
		return fmt.Sprintf("HTTP %d: %v", e.status, e.err)
	}
	return e.err.Error()
}

func (e *attemptError) Unwrap() error { return e.err }

// attempt makes one POST of j's body, bounded by the route's timeout.
func (r *route) attempt(ctx context.Context, j *job, n int, now time.Time) error {
	actx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(actx, http.MethodPost, r.cfg.URL, bytes.NewReader(j.body))
	if err != nil {
		return &attemptError{err: fmt.Errorf("building request: %w", err)}
	}
	ts := strconv.FormatInt(now.Unix(), 10)
	h := req.Header
	h.Set("Content-Type", "application/json")
	h.Set("User-Agent", "vigil-alertroute/1")
	h.Set(HeaderIdempotencyKey, j.ev.GetEventId())
	h.Set(HeaderEventType, j.ev.GetType().Label())
	h.Set(HeaderAttempt, strconv.Itoa(n))
	h.Set(HeaderTimestamp, ts)
	if len(r.secret) > 0 {
		h.Set(HeaderSignature, Sign(r.secret, ts, j.body))
	}
	resp, err := r.requests.Do(req)
	if err != nil {
		// Connection refused/reset, DNS, TLS, timeout: another attempt may
		// get through.
		return &attemptError{retriable: true, err: fmt.Errorf("posting to %s: %w", r.cfg.Name, err)}
	}
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)) // lets the connection be reused
	_ = resp.Body.Close()
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return nil
	}
	msg := strings.TrimSpace(string(snippet))
	if msg == "" {
		msg = http.StatusText(resp.StatusCode)
	}
	ae := &attemptError{status: resp.StatusCode, err: errors.New(msg)}
	switch {
	case resp.StatusCode == http.StatusRequestTimeout, resp.StatusCode == http.StatusTooManyRequests, resp.StatusCode >= 500:
		ae.retriable = true
		ae.retryAfter = retryAfter(resp.Header.Get("Retry-After"), now)
	}
	return ae
}

// retryAfter parses a Retry-After header (seconds or an HTTP date); 0 when
// absent or unreadable.
func retryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// backoff is the delay before attempt n+1 (n from 1): exponential from
// initial, capped at maxDelay, with equal jitter (half fixed, half random)
// so that several stages do not retry in step.
func backoff(initial, maxDelay time.Duration, n int) time.Duration {
	d := initial
	for i := 1; i < n && d < maxDelay; i++ {
		d *= 2
	}
	d = min(d, maxDelay)
	return d/2 + rand.N(d/2+1)
}
