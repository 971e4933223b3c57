// Package dedupe suppresses duplicates within a time window: a sample seen
// again by (tenant, device, sequence), or an HL7 message by (source, sender,
// message control id), as senders do when they retry after a lost answer.
//
// A Filter remembers keys for a window, bounded in memory: past maxEntries
// it forgets the oldest entries (counted as evictions), so a flood of
// distinct keys costs a bounded amount of memory and only shortens how far
// back duplicates are caught.
//
// It is hand-written rather than an LRU library, for the hot path (a check
// and an insert per sample, hundreds of thousands per second):
//   - entries expire by insertion time, not by use, so no per-hit
//     reordering is needed;
//   - it never deletes from a large map (Go maps then probe through
//     tombstones): each of 16 shards keeps two generations of at most
//     maxEntries/32 entries; inserts go to the current one; when it is
//     full, or a window old, it becomes the previous one and the previous
//     one is dropped whole. An entry is remembered for at least the window
//     unless the filter is full; a full filter still remembers its newest
//     maxEntries/2 entries at least;
//   - keys are stored as 128-bit hashes (Key), without pointers, so that
//     the garbage collector does not scan a million of them;
//   - a device's sequence numbers share one entry per block of 64
//     consecutive numbers (a Ref: the block's Key and the number's bit), so
//     a gateway's batch of 1000 consecutive samples touches about 16 map
//     entries, which stay in the CPU cache, instead of 1000 scattered ones.
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
// million remembered keys hold no pointers and need no allocation; two
// distinct keys share a Key with probability 2^-128, and the random seeds
// keep senders from choosing keys that collide.
type Key [2]uint64

// Ref names what a Filter remembers: the entry Key and bits of it. A
// message key is one entry with bit 0 (Bits 1); a sample's sequence number
// is one bit of the entry of its block of 64 (see SampleRef).
type Ref struct {
	Key  Key
	Bits uint64
}

// Filter is a bounded, windowed set of recently seen keys. It is safe for
// concurrent use; no call blocks beyond a short lock.
type Filter struct {
	window time.Duration
	clock  clock.Clock
	seeds  [2]maphash.Seed
	genMax int // entries per generation of a shard
	shard  [shards]shard

	evictedN atomic.Uint64
}

// entry is the bits a key holds and when they were last added (unix nanos).
type entry struct {
	at   int64
	bits uint64
}

// shard is two generations of entries.
type shard struct {
	mu        sync.Mutex
	cur, prev map[Key]entry
	// curStart is when cur was started; curNewest and prevNewest are
	// the newest insertion times in cur and prev.
	curStart, curNewest, prevNewest int64
}

// New returns a Filter remembering keys for window, at most maxEntries
// entries (at least 32), timed by clk (nil: system clock). Its memory,
// about 50 bytes per entry, is taken as entries arrive.
func New(window time.Duration, maxEntries int, clk clock.Clock) *Filter {
	if clk == nil {
		clk = clock.System{}
	}
	f := &Filter{window: window, clock: clk, seeds: [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()},
		genMax: max(maxEntries/(2*shards), 1)}
	now := clk.Now().UnixNano()
	for i := range f.shard {
		f.shard[i] = shard{cur: map[Key]entry{}, prev: map[Key]entry{}, curStart: now}
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
			Help: "Entries (a message key, or a block of 64 sequence numbers of a device) dropped from a duplicate filter before their window ended, because it was full: duplicates older than them are no longer caught."},
			func() float64 { return float64(f.evictedN.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "vigil_ingest_dedupe_keys", ConstLabels: labels,
			Help: "Entries a duplicate filter remembers (a message key, or a block of 64 sequence numbers of a device; expired ones are dropped a window at a time)."},
			func() float64 { return float64(f.Len()) }))
}

// Key hashes key bytes into the Filter's fixed-size Key. It does not
// allocate; key is not retained.
func (f *Filter) Key(key []byte) Key {
	return Key{maphash.Bytes(f.seeds[0], key), maphash.Bytes(f.seeds[1], key)}
}

// SampleRef returns the Ref of a sample's (tenant, device, sequence): the
// Key of its block of 64 consecutive sequence numbers and its bit. buf is
// scratch space, returned for reuse; nothing is retained.
func (f *Filter) SampleRef(buf []byte, tenant, device string, seq uint64) (Ref, []byte) {
	buf = append(buf[:0], 'b', 0)
	buf = append(append(buf, tenant...), 0)
	buf = append(append(buf, device...), 0)
	buf = strconv.AppendUint(buf, seq>>6, 10)
	return Ref{Key: f.Key(buf), Bits: 1 << (seq & 63)}, buf
}

// Seen reports whether key was recorded within the window; if not, it
// records it (so of two concurrent calls with one key exactly one gets
// false). Use it where a key may be recorded before the work it stands for
// is durable; otherwise use Contains, then Add once it is.
func (f *Filter) Seen(key []byte) bool { return f.SeenKey(f.Key(key)) }

// SeenKey is Seen for a Key made by f.Key.
func (f *Filter) SeenKey(k Key) bool {
	r := Ref{Key: k, Bits: 1}
	now := f.clock.Now().UnixNano()
	s := f.shardOf(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.containsLocked(s, r, now) {
		return true
	}
	f.addLocked(s, r, now)
	return false
}

// Contains reports whether key was recorded within the window, without
// recording it. It does not allocate.
func (f *Filter) Contains(key []byte) bool { return f.ContainsKey(f.Key(key)) }

// ContainsKey is Contains for a Key made by f.Key.
func (f *Filter) ContainsKey(k Key) bool {
	r := Ref{Key: k, Bits: 1}
	now := f.clock.Now().UnixNano()
	s := f.shardOf(k)
	s.mu.Lock()
	ok := f.containsLocked(s, r, now)
	s.mu.Unlock()
	return ok
}

// Add records key as seen now (again, if it was). key is not retained.
func (f *Filter) Add(key []byte) { f.AddKey(f.Key(key)) }

// AddKey is Add for a Key made by f.Key.
func (f *Filter) AddKey(k Key) {
	r := Ref{Key: k, Bits: 1}
	now := f.clock.Now().UnixNano()
	s := f.shardOf(k)
	s.mu.Lock()
	f.addLocked(s, r, now)
	s.mu.Unlock()
}

// ContainsRefs appends to found, for each of refs, whether all its bits
// were recorded within the window, and returns found. It takes each
// shard's lock once, so a request's samples cost one clock reading and at
// most 16 lock round trips.
func (f *Filter) ContainsRefs(refs []Ref, found []bool) []bool {
	now := f.clock.Now().UnixNano()
	start := len(found)
	found = append(found, make([]bool, len(refs))...)
	res := found[start:]
	f.eachShard(refs, func(s *shard, i int) { res[i] = f.containsLocked(s, refs[i], now) })
	return found
}

// AddRefs records refs as seen now, taking each shard's lock once.
func (f *Filter) AddRefs(refs []Ref) {
	now := f.clock.Now().UnixNano()
	f.eachShard(refs, func(s *shard, i int) { f.addLocked(s, refs[i], now) })
}

// eachShard calls fn for each ref index, grouped by shard, with the shard's
// lock held.
func (f *Filter) eachShard(refs []Ref, fn func(s *shard, i int)) {
	if len(refs) == 1 {
		s := f.shardOf(refs[0].Key)
		s.mu.Lock()
		fn(s, 0)
		s.mu.Unlock()
		return
	}
	for sh := range f.shard {
		s := &f.shard[sh]
		locked := false
		for i := range refs {
			if int(refs[i].Key[1]&(shards-1)) != sh {
				continue
			}
			if !locked {
				s.mu.Lock()
				locked = true
			}
			fn(s, i)
		}
		if locked {
			s.mu.Unlock()
		}
	}
}

func (f *Filter) shardOf(k Key) *shard { return &f.shard[k[1]&(shards-1)] }

// containsLocked reports whether r's bits are recorded within the window,
// in either generation.
func (f *Filter) containsLocked(s *shard, r Ref, now int64) bool {
	w := int64(f.window)
	var bits uint64
	if e, ok := s.cur[r.Key]; ok && now-e.at < w {
		bits = e.bits
	}
	if bits&r.Bits != r.Bits {
		if e, ok := s.prev[r.Key]; ok && now-e.at < w {
			bits |= e.bits
		}
	}
	return bits&r.Bits == r.Bits
}

func (f *Filter) addLocked(s *shard, r Ref, now int64) {
	f.expireLocked(s, now)
	e, ok := s.cur[r.Key]
	if !ok && len(s.cur) >= f.genMax {
		// Full: the previous generation goes, its entries still inside
		// the window counted as evicted.
		n := 0
		if now-s.prevNewest < int64(f.window) {
			for _, pe := range s.prev {
				if now-pe.at < int64(f.window) {
					n++
				}
			}
		}
		f.evictedN.Add(uint64(n))
		s.rotate(now)
	}
	if ok && now-e.at >= int64(f.window) {
		e.bits = 0 // expired bits do not come back
	}
	s.cur[r.Key] = entry{at: now, bits: e.bits | r.Bits}
	s.curNewest = max(s.curNewest, now)
}

// expireLocked drops the generations whose entries are all older than the
// window.
func (f *Filter) expireLocked(s *shard, now int64) {
	w := int64(f.window)
	if now-s.curStart >= w && len(s.cur) > 0 {
		// Every entry of prev is older than cur's start: expired.
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

// Len returns the number of entries remembered (it drops expired
// generations first; entries of a generation still in force may have
// expired).
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

// Evicted returns how many entries were evicted early because the filter
// was full.
func (f *Filter) Evicted() uint64 { return f.evictedN.Load() }

// SampleKey is the key of a sample: tenant, device and device sequence (for
// Seen/Contains/Add; SampleRef is the cheaper form for many samples).
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
