package mllp

import (
	"context"
	"math"
	"sync"
	"time"
)

// dedupe remembers message keys for a window, bounded in count: the oldest
// are forgotten first. Written here because no shared ingest/dedupe package
// exists yet. Safe for concurrent use.
type dedupe struct {
	window time.Duration
	max    int

	mu    sync.Mutex
	seen  map[string]int64 // key → when recorded (unix ns)
	queue []dedupeEntry    // FIFO ring of the keys in recording order
	head  int
	// evicted counts keys forgotten before their window ended.
	evicted func()
}

type dedupeEntry struct {
	key string
	at  int64
}

func newDedupe(window time.Duration, max int, evicted func()) *dedupe {
	if window <= 0 || max < 1 {
		return nil
	}
	return &dedupe{window: window, max: max, seen: map[string]int64{}, evicted: evicted}
}

// Seen reports whether key was recorded within the window before now.
func (d *dedupe) Seen(key string, now time.Time) bool {
	if d == nil {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	at, ok := d.seen[key]
	return ok && now.UnixNano()-at < int64(d.window)
}

// Add records key at now.
func (d *dedupe) Add(key string, now time.Time) {
	if d == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	ns := now.UnixNano()
	d.expire(ns)
	if _, ok := d.seen[key]; !ok && len(d.seen) >= d.max {
		d.popOldest()
		d.evicted()
	}
	d.seen[key] = ns
	d.queue = append(d.queue, dedupeEntry{key, ns})
	// Compact the ring once its dead head is half of it.
	if d.head > 1024 && d.head*2 > len(d.queue) {
		d.queue = append(d.queue[:0], d.queue[d.head:]...)
		d.head = 0
	}
}

func (d *dedupe) expire(ns int64) {
	for d.head < len(d.queue) && ns-d.queue[d.head].at >= int64(d.window) {
		d.popOldest()
	}
}

func (d *dedupe) popOldest() {
	for d.head < len(d.queue) {
		e := d.queue[d.head]
		d.queue[d.head] = dedupeEntry{}
		d.head++
		// A key re-added later has a newer entry; only the newest counts.
		if at, ok := d.seen[e.key]; ok && at == e.at {
			delete(d.seen, e.key)
			return
		}
	}
}

// limiter is a per-source token bucket that delays rather than refuses:
// Reserve says how long to wait before answering. The number of sources
// is bounded; when full, an arbitrary idle bucket is forgotten (counted).
// Written here because no shared ingest/ratelimit package exists yet. Safe
// for concurrent use.
type limiter struct {
	rate    float64
	burst   float64
	max     int
	mu      sync.Mutex
	buckets map[string]*bucket
	evicted func()
}

type bucket struct {
	tokens float64
	last   int64 // unix ns
}

// maxSources bounds the buckets kept.
const maxSources = 10_000

func newLimiter(rate float64, burst int, evicted func()) *limiter {
	if rate <= 0 {
		return nil
	}
	return &limiter{rate: rate, burst: float64(max(burst, 1)), max: maxSources, buckets: map[string]*bucket{}, evicted: evicted}
}

// Reserve takes one token for source at now and returns how long the caller
// must wait for it (0 when one was available).
func (l *limiter) Reserve(source string, now time.Time) time.Duration {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	ns := now.UnixNano()
	b := l.buckets[source]
	if b == nil {
		if len(l.buckets) >= l.max {
			for k := range l.buckets {
				delete(l.buckets, k)
				l.evicted()
				break
			}
		}
		b = &bucket{tokens: l.burst, last: ns}
		l.buckets[source] = b
	}
	elapsed := float64(ns-b.last) / 1e9
	if elapsed > 0 {
		b.tokens = math.Min(l.burst, b.tokens+elapsed*l.rate)
		b.last = ns
	}
	b.tokens--
	if b.tokens >= 0 {
		return 0
	}
	return time.Duration(-b.tokens / l.rate * 1e9)
}

// Refund gives back a token taken by Reserve whose wait was abandoned.
func (l *limiter) Refund(source string) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if b := l.buckets[source]; b != nil {
		b.tokens = math.Min(l.burst, b.tokens+1)
	}
}

// sleep waits d or until ctx ends (false).
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
