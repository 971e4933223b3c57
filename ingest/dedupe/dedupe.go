// Package dedupe suppresses duplicates within a time window: a sample seen
// again by (tenant, device, sequence), or an HL7 message by (source, sender,
// message control id), as senders do when they retry after a lost answer.
//
// A Filter remembers keys for a window, bounded in memory: past maxEntries
// it evicts the oldest keys (counted), so a flood of distinct keys costs a
// bounded amount of memory and only shortens how far back duplicates are
// caught. It is hand-written rather than an LRU library because entries
// expire by insertion time (a FIFO ring), which needs no per-hit list
// reordering: Seen is one map lookup under a shard lock.
package dedupe

import (
	"hash/maphash"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/stage"
)

// shards spreads keys over independently locked parts (a power of two).
const shards = 16

// Filter is a bounded, windowed set of recently seen keys. It is safe for
// concurrent use; no call blocks beyond a short lock.
type Filter struct {
	window time.Duration
	clock  clock.Clock
	seed   maphash.Seed
	shard  [shards]shard

	evictedN atomic.Uint64
}

type shard struct {
	mu   sync.Mutex
	seen map[string]int64 // key → insertion time (unix nanos)
	// ring holds the keys in insertion order (a FIFO of capacity max):
	// the oldest key is at head. A key re-recorded after expiry is
	// appended again; its stale ring slot is recognised by its time.
	ring  []entry
	head  int
	count int
}

type entry struct {
	key string
	at  int64
}

// New returns a Filter remembering keys for window, at most maxEntries of
// them (rounded up to a multiple of 16), timed by clk (nil: system clock).
func New(window time.Duration, maxEntries int, clk clock.Clock) *Filter {
	if clk == nil {
		clk = clock.System{}
	}
	if maxEntries < shards {
		maxEntries = shards
	}
	per := (maxEntries + shards - 1) / shards
	f := &Filter{window: window, clock: clk, seed: maphash.MakeSeed()}
	for i := range f.shard {
		f.shard[i].seen = make(map[string]int64, min(per, 1<<16))
		f.shard[i].ring = make([]entry, per)
	}
	return f
}

// Register registers the filter's metrics on reg, labelled
// filter=name (e.g. "http_samples", "mllp_messages"), so that several
// filters share one registry: vigil_ingest_dedupe_evictions_total and
// vigil_ingest_dedupe_keys.
func (f *Filter) Register(reg prometheus.Registerer, name string) error {
	labels := prometheus.Labels{"filter": name}
	return stage.Register(reg, "dedupe metrics",
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "vigil_ingest_dedupe_evictions_total", ConstLabels: labels,
			Help: "Keys dropped from a duplicate filter before their window ended, because it was full (duplicates older than the evicted keys are no longer caught)."},
			func() float64 { return float64(f.evictedN.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "vigil_ingest_dedupe_keys", ConstLabels: labels,
			Help: "Keys a duplicate filter remembers."},
			func() float64 { return float64(f.Len()) }))
}

// Seen reports whether key was recorded within the window; if not, it
// records it (so of two concurrent calls with one key exactly one gets
// false). Use it where a key may be recorded before the work it stands for
// is durable; otherwise use Contains, then Add once it is.
func (f *Filter) Seen(key []byte) bool {
	now := f.clock.Now().UnixNano()
	s := f.shardOf(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	if at, ok := s.seen[string(key)]; ok && now-at < int64(f.window) {
		return true
	}
	f.addLocked(s, key, now)
	return false
}

// Contains reports whether key was recorded within the window, without
// recording it. It does not allocate.
func (f *Filter) Contains(key []byte) bool {
	now := f.clock.Now().UnixNano()
	s := f.shardOf(key)
	s.mu.Lock()
	at, ok := s.seen[string(key)]
	s.mu.Unlock()
	return ok && now-at < int64(f.window)
}

// Add records key as seen now (again, if it was). The Filter keeps its own
// copy of key.
func (f *Filter) Add(key []byte) {
	now := f.clock.Now().UnixNano()
	s := f.shardOf(key)
	s.mu.Lock()
	f.addLocked(s, key, now)
	s.mu.Unlock()
}

func (f *Filter) shardOf(key []byte) *shard {
	return &f.shard[maphash.Bytes(f.seed, key)&(shards-1)]
}

func (f *Filter) addLocked(s *shard, key []byte, now int64) {
	// Drop expired keys from the front, then make room.
	s.expire(now - int64(f.window))
	if s.count == len(s.ring) {
		s.popOldest()
		f.evictedN.Add(1)
	}
	k := string(key)
	s.seen[k] = now
	s.ring[(s.head+s.count)%len(s.ring)] = entry{key: k, at: now}
	s.count++
}

// Len returns the number of keys remembered (including expired ones not yet
// dropped).
func (f *Filter) Len() int {
	n := 0
	for i := range f.shard {
		s := &f.shard[i]
		s.mu.Lock()
		n += len(s.seen)
		s.mu.Unlock()
	}
	return n
}

// Evicted returns how many keys were evicted early because the filter was
// full.
func (f *Filter) Evicted() uint64 { return f.evictedN.Load() }

func (s *shard) expire(before int64) {
	for s.count > 0 && s.ring[s.head].at <= before {
		s.popOldest()
	}
}

func (s *shard) popOldest() {
	e := s.ring[s.head]
	if at, ok := s.seen[e.key]; ok && at == e.at {
		delete(s.seen, e.key)
	}
	s.ring[s.head] = entry{}
	s.head = (s.head + 1) % len(s.ring)
	s.count--
}

// SampleKey is the key of a sample: tenant, device and device sequence.
func SampleKey(buf []byte, tenant, device string, seq uint64) []byte {
	buf = append(buf, 's', 0)
	buf = append(append(buf, tenant...), 0)
	buf = append(append(buf, device...), 0)
	return strconv.AppendUint(buf, seq, 10)
}

// MessageKey is the key of a message: source, sender and message id (e.g.
// "mllp", MSH-3/MSH-4, MSH-10).
func MessageKey(buf []byte, source, sender, messageID string) []byte {
	buf = append(buf, 'm', 0)
	buf = append(append(buf, source...), 0)
	buf = append(append(buf, sender...), 0)
	return append(buf, messageID...)
}
