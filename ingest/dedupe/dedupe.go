// Package dedupe suppresses duplicates within a time window: a sample seen
// again by (tenant, device, sequence), or an HL7 message by (source, sender,
// message control id), as senders do when they retry after a lost answer.
//
// A Filter remembers keys for a window, bounded in memory: past maxEntries
// it forgets the oldest keys (counted as evictions), so a flood of distinct
// keys costs a bounded amount of memory and only shortens how far back
// duplicates are caught.
//
// It is hand-written rather than an LRU library: entries expire by
// insertion time, not by use, so no per-hit reordering is needed, and the
// hot path (a check and an insert per sample, at hundreds of thousands per
// second) must not delete from a large map (Go maps then probe through
// tombstones). Each of 16 shards keeps two generations of at most
// maxEntries/32 keys: inserts go to the current one; when it is full, or a
// window old, it becomes the previous one and the previous one is dropped
// whole. A key is remembered for at least the window unless the filter is
// full; a full filter still remembers the newest maxEntries/2 keys at least.
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

// Key is the fixed-size form of a key: a 128-bit hash under the Filter's
// random seeds. Filters store Keys rather than the key bytes, so that a
// million remembered keys hold no pointers (the garbage collector does not
// scan them) and need no allocation; two distinct keys share a Key with
// probability 2^-128, and the random seeds keep senders from choosing keys
// that collide.
type Key [2]uint64

// Filter is a bounded, windowed set of recently seen keys. It is safe for
// concurrent use; no call blocks beyond a short lock.
type Filter struct {
	window time.Duration
	clock  clock.Clock
	seeds  [2]maphash.Seed
	genMax int // keys per generation of a shard
	shard  [shards]shard

	evictedN atomic.Uint64
}

// shard is two generations of keys, each mapping a key to its insertion
// time (unix nanos).
type shard struct {
	mu        sync.Mutex
	cur, prev map[Key]int64
	// curStart is when cur was started; curNewest and prevNewest are
	// the newest insertion times in cur and prev.
	curStart, curNewest, prevNewest int64
}

// New returns a Filter remembering keys for window, at most maxEntries of
// them (at least 32), timed by clk (nil: system clock). Its memory, about
// 40 bytes per key, is taken as keys arrive.
func New(window time.Duration, maxEntries int, clk clock.Clock) *Filter {
	if clk == nil {
		clk = clock.System{}
	}
	f := &Filter{window: window, clock: clk, seeds: [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()},
		genMax: max(maxEntries/(2*shards), 1)}
	now := clk.Now().UnixNano()
	for i := range f.shard {
		f.shard[i] = shard{cur: map[Key]int64{}, prev: map[Key]int64{}, curStart: now}
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
			Help: "Keys a duplicate filter remembers (expired ones are dropped a window at a time)."},
			func() float64 { return float64(f.Len()) }))
}

// Key hashes key bytes into the Filter's fixed-size Key. It does not
// allocate; key is not retained.
func (f *Filter) Key(key []byte) Key {
	return Key{maphash.Bytes(f.seeds[0], key), maphash.Bytes(f.seeds[1], key)}
}

// Seen reports whether key was recorded within the window; if not, it
// records it (so of two concurrent calls with one key exactly one gets
// false). Use it where a key may be recorded before the work it stands for
// is durable; otherwise use Contains, then Add once it is.
func (f *Filter) Seen(key []byte) bool { return f.SeenKey(f.Key(key)) }

// SeenKey is Seen for a Key made by f.Key.
func (f *Filter) SeenKey(k Key) bool {
	now := f.clock.Now().UnixNano()
	s := f.shardOf(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.containsLocked(s, k, now) {
		return true
	}
	f.addLocked(s, k, now)
	return false
}

// Contains reports whether key was recorded within the window, without
// recording it. It does not allocate.
func (f *Filter) Contains(key []byte) bool { return f.ContainsKey(f.Key(key)) }

// ContainsKey is Contains for a Key made by f.Key.
func (f *Filter) ContainsKey(k Key) bool {
	now := f.clock.Now().UnixNano()
	s := f.shardOf(k)
	s.mu.Lock()
	ok := f.containsLocked(s, k, now)
	s.mu.Unlock()
	return ok
}

// Add records key as seen now (again, if it was). key is not retained.
func (f *Filter) Add(key []byte) { f.AddKey(f.Key(key)) }

// AddKey is Add for a Key made by f.Key.
func (f *Filter) AddKey(k Key) {
	now := f.clock.Now().UnixNano()
	s := f.shardOf(k)
	s.mu.Lock()
	f.addLocked(s, k, now)
	s.mu.Unlock()
}

func (f *Filter) shardOf(k Key) *shard { return &f.shard[k[1]&(shards-1)] }

func (f *Filter) containsLocked(s *shard, k Key, now int64) bool {
	if at, ok := s.cur[k]; ok {
		return now-at < int64(f.window)
	}
	at, ok := s.prev[k]
	return ok && now-at < int64(f.window)
}

func (f *Filter) addLocked(s *shard, k Key, now int64) {
	f.expireLocked(s, now)
	if len(s.cur) >= f.genMax {
		if _, again := s.cur[k]; !again {
			// Full: the previous generation goes, its keys still
			// inside the window counted as evicted.
			n := 0
			if s.prevNewest > now-int64(f.window) {
				for _, at := range s.prev {
					if now-at < int64(f.window) {
						n++
					}
				}
			}
			f.evictedN.Add(uint64(n))
			s.rotate(now)
		}
	}
	s.cur[k] = now
	s.curNewest = max(s.curNewest, now)
}

// expireLocked drops the generations whose keys are all older than the
// window.
func (f *Filter) expireLocked(s *shard, now int64) {
	w := int64(f.window)
	if now-s.curStart >= w && len(s.cur) > 0 {
		// Every key of prev is older than cur's start: expired.
		s.rotate(now)
	}
	if len(s.prev) > 0 && now-s.prevNewest >= w {
		clear(s.prev)
	}
}

// rotate makes cur the previous generation and starts an empty one (the
// old previous map, cleared: its memory is reused).
func (s *shard) rotate(now int64) {
	clear(s.prev)
	s.cur, s.prev = s.prev, s.cur
	s.curStart, s.prevNewest, s.curNewest = now, s.curNewest, 0
}

// Len returns the number of keys remembered (it drops expired generations
// first; keys of a generation still in force may have expired).
func (f *Filter) Len() int {
	now := f.clock.Now().UnixNano()
	n := 0
	for i := range f.shard {
		s := &f.shard[i]
		s.mu.Lock()
		f.expireLocked(s, now)
		n += len(s.cur) + len(s.prev)
		s.mu.Unlock()
	}
	return n
}

// Evicted returns how many keys were evicted early because the filter was
// full.
func (f *Filter) Evicted() uint64 { return f.evictedN.Load() }

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
