// Package ratelimit keeps one token bucket per source (an HTTP sender, an
// MLLP connection, an MQTT client), so that a gateway replaying its history
// at full speed cannot starve live monitors: HTTP refuses what is over the
// limit (429 with Retry-After, via Allow); MLLP and MQTT slow down instead
// (Wait), which backs the sender off through TCP.
//
// Each bucket refills at the configured samples per second and holds at most
// burst samples. A request larger than the bucket is let through when the
// bucket is full and leaves it in debt, so big batches are allowed but the
// sustained rate still holds. The key table is bounded: past maxKeys the
// least recently used bucket is dropped (counted), which at worst gives that
// sender a fresh bucket.
//
// Hand-written rather than golang.org/x/time/rate: the bucket and its LRU
// slot are updated under one lock in a few lines, and the shared go.mod
// gains no dependency for it.
package ratelimit

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/stage"
)

// Limiter is a bounded table of token buckets, one per key. It is safe for
// concurrent use. A Limiter with rate 0 allows everything.
type Limiter struct {
	rate  float64 // tokens per second; 0 = unlimited
	burst float64
	max   int
	clock clock.Clock

	mu    sync.Mutex
	keys  map[string]*list.Element // → *bucket
	order *list.List               // front = most recently used

	limited   atomic.Uint64
	evictions atomic.Uint64
	waited    atomic.Int64 // nanoseconds slept in Wait
}

type bucket struct {
	key    string
	tokens float64
	last   int64 // unix nanos of the last refill
}

// New returns a Limiter allowing samplesPerSecond per key (0: unlimited)
// with buckets of burst samples (0: one second's worth, at least 1),
// remembering at most maxKeys keys (at least 1), timed by clk (nil: system
// clock).
func New(samplesPerSecond float64, burst, maxKeys int, clk clock.Clock) *Limiter {
	if clk == nil {
		clk = clock.System{}
	}
	if samplesPerSecond < 0 || math.IsNaN(samplesPerSecond) || math.IsInf(samplesPerSecond, 0) {
		samplesPerSecond = 0
	}
	b := float64(burst)
	if burst <= 0 {
		b = math.Max(1, math.Ceil(samplesPerSecond))
	}
	return &Limiter{rate: samplesPerSecond, burst: b, max: max(maxKeys, 1), clock: clk,
		keys: map[string]*list.Element{}, order: list.New()}
}

// Unlimited reports whether the Limiter allows everything.
func (l *Limiter) Unlimited() bool { return l.rate == 0 }

// Register registers the limiter's metrics on reg, labelled source=name:
// vigil_ingest_rate_limited_total (requests refused or slowed),
// vigil_ingest_rate_limit_wait_seconds_total, vigil_ingest_rate_limit_evictions_total
// and vigil_ingest_rate_limit_keys.
func (l *Limiter) Register(reg prometheus.Registerer, source string) error {
	labels := prometheus.Labels{"source": source}
	return stage.Register(reg, "rate limit metrics",
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "vigil_ingest_rate_limited_total", ConstLabels: labels,
			Help: "Requests over their source's rate limit: refused (HTTP 429) or slowed down (MLLP, MQTT)."},
			func() float64 { return float64(l.limited.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "vigil_ingest_rate_limit_wait_seconds_total", ConstLabels: labels,
			Help: "Time senders were slowed down by their rate limit."},
			func() float64 { return time.Duration(l.waited.Load()).Seconds() }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "vigil_ingest_rate_limit_evictions_total", ConstLabels: labels,
			Help: "Rate-limit buckets dropped because the key table was full (least recently used first)."},
			func() float64 { return float64(l.evictions.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "vigil_ingest_rate_limit_keys", ConstLabels: labels,
			Help: "Rate-limit buckets kept."},
			func() float64 { return float64(l.Len()) }))
}

// Allow takes n tokens from key's bucket if it has them (or is full) and
// reports true; otherwise it takes nothing and reports false with how long
// until the request would be allowed (for Retry-After). It does not block.
func (l *Limiter) Allow(key string, n int) (ok bool, retryAfter time.Duration) {
	if l.rate == 0 || n <= 0 {
		return true, 0
	}
	now := l.clock.Now().UnixNano()
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.bucketLocked(key, now)
	need := math.Min(float64(n), l.burst)
	if b.tokens >= need {
		b.tokens -= float64(n)
		return true, 0
	}
	l.limited.Add(1)
	return false, l.durationFor(need - b.tokens)
}

// Wait takes n tokens from key's bucket, blocking until the bucket has paid
// them back when it goes into debt, or until ctx ends (then the tokens are
// returned and ctx's error is returned). Senders that must not be refused
// (MLLP, MQTT) are slowed down this way.
func (l *Limiter) Wait(ctx context.Context, key string, n int) error {
	if l.rate == 0 || n <= 0 {
		return ctx.Err()
	}
	now := l.clock.Now().UnixNano()
	l.mu.Lock()
	b := l.bucketLocked(key, now)
	// Like Allow, a full bucket lets a request larger than burst through
	// at once; anything else waits for its missing tokens.
	need := math.Min(float64(n), l.burst)
	var delay time.Duration
	if b.tokens < need {
		delay = l.durationFor(need - b.tokens)
	}
	b.tokens -= float64(n)
	l.mu.Unlock()
	if delay <= 0 {
		return ctx.Err()
	}
	l.limited.Add(1)
	t := time.NewTimer(delay)
	defer t.Stop()
	start := time.Now()
	select {
	case <-t.C:
		l.waited.Add(int64(time.Since(start)))
		return nil
	case <-ctx.Done():
		l.waited.Add(int64(time.Since(start)))
		l.mu.Lock()
		if e, ok := l.keys[key]; ok && e.Value.(*bucket) == b {
			b.tokens = math.Min(l.burst, b.tokens+float64(n))
		}
		l.mu.Unlock()
		return fmt.Errorf("waiting for the rate limit of %q: %w", key, ctx.Err())
	}
}

// ErrLimited tells a caller that a request was over its rate limit.
var ErrLimited = errors.New("rate limited")

// Len returns the number of buckets kept.
func (l *Limiter) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.keys)
}

// Evictions returns how many buckets were dropped for the key bound.
func (l *Limiter) Evictions() uint64 { return l.evictions.Load() }

// Limited returns how many requests were refused or slowed.
func (l *Limiter) Limited() uint64 { return l.limited.Load() }

func (l *Limiter) durationFor(tokens float64) time.Duration {
	d := time.Duration(tokens / l.rate * float64(time.Second))
	return max(d, time.Millisecond)
}

// bucketLocked returns key's bucket, refilled to now, as most recently used.
func (l *Limiter) bucketLocked(key string, now int64) *bucket {
	if e, ok := l.keys[key]; ok {
		l.order.MoveToFront(e)
		b := e.Value.(*bucket)
		if elapsed := now - b.last; elapsed > 0 {
			b.tokens = math.Min(l.burst, b.tokens+float64(elapsed)/float64(time.Second)*l.rate)
			b.last = now
		}
		return b
	}
	if len(l.keys) >= l.max {
		oldest := l.order.Back()
		l.order.Remove(oldest)
		delete(l.keys, oldest.Value.(*bucket).key)
		l.evictions.Add(1)
	}
	b := &bucket{key: key, tokens: l.burst, last: now}
	l.keys[key] = l.order.PushFront(b)
	return b
}
