package window

import (
	"math"
	"math/bits"
	"slices"

	"github.com/vigilhealth/vigil/features/hrv"
)

// Patient is the window state of one patient (every metric). The zero value
// is not ready: use NewPatient. Not safe for concurrent use: it belongs to
// the goroutine that owns the patient's partition.
type Patient struct {
	wm, maxEvent int64
	series       []series // sorted by metric index
	have         uint64   // bit i: series holds metric index i
	pending      []pendingWin
	corr         []correction
	// sessEnd is a lower bound of the end of the open sessions.
	sessEnd int64
}

// NewPatient returns an empty patient state.
func NewPatient() *Patient { return &Patient{wm: noEvent, maxEvent: noEvent, sessEnd: math.MaxInt64} }

// Empty reports whether p holds no open window (nothing worth keeping).
func (p *Patient) Empty() bool { return len(p.series) == 0 && len(p.corr) == 0 && len(p.pending) == 0 }

type pendingWin struct {
	def     uint8
	emitted bool
	end     int64
}

type correction struct {
	def     uint8
	version uint32
	end     int64
}

type winRef struct {
	def        uint8
	version    uint32
	start, end int64
}

type timed struct {
	t int64
	k int32
}

// run is one distinct key of a pane and how many samples had it.
type run struct {
	k int32
	c uint32
}

// pane is the aggregate of one metric over one pane (or one session).
// 72 bytes; its runs live in the series' arena at [off, off+nr).
type pane struct {
	start              int64
	sk, skk            int64
	sx, sxx, sxy       int64
	n                  uint32
	first, last, lastK int32
	off                uint32
	nr                 uint16
	events             uint16
}

// series is one metric of one patient: its panes (sorted by start) and
// their runs in one arena (in pane order). Rarely used parts are behind x.
type series struct {
	m     uint8
	panes []pane
	runs  []run
	x     *extra
}

type extra struct {
	occ   []uint64 // wear time: occupied-seconds bitmaps, parallel to panes
	seq   []timed  // hrv: samples in event-time order
	desat desatState
	sess  []session
}

type session struct {
	acc  pane
	runs []run
}

type desatState struct {
	pending                  []timed
	started, hasBase         bool
	inEvent, counted         bool
	baseline                 int32
	paneMs                   int64
	eventStart, eventLastLow int64
}

// seriesFor returns the series of metric index mi, inserting it. The
// series are sorted by metric index and have marks which are present, so
// the index of mi is the count of present metrics below it.
func (p *Patient) seriesFor(mi int, withExtra bool) *series {
	bit := uint64(1) << uint(mi)
	i := bits.OnesCount64(p.have & (bit - 1))
	if p.have&bit == 0 {
		if len(p.series) == cap(p.series) {
			// Grown one at a time: a patient has a handful of metrics,
			// and doubling would leave up to half the slice unused.
			grown := make([]series, len(p.series), len(p.series)+1)
			copy(grown, p.series)
			p.series = grown
		}
		p.series = slices.Insert(p.series, i, series{m: uint8(mi)})
		p.have |= bit
	}
	s := &p.series[i]
	if withExtra && s.x == nil {
		s.x = &extra{}
	}
	return s
}

// Warm reads the memory of p that Add and Advance are about to use (each
// series' newest pane and runs) and returns a value of no meaning, which
// the caller keeps somewhere so that the reads are not dropped. With
// thousands of patients a patient's state is rarely in cache, and Add
// meets its misses one after another, each behind the last; these loads
// are independent of each other, so the CPU overlaps them (Go has no
// prefetch instruction: this is the portable stand-in). Call it before
// other work on the record (decoding it), which then hides them too.
// Read-only: safe wherever reading p is.
func (p *Patient) Warm() uint64 {
	var x uint64
	for i := range p.series {
		s := &p.series[i]
		if n := len(s.panes); n > 0 {
			// Both ends: a 72-byte pane can straddle two cache lines.
			x += uint64(s.panes[n-1].start) + uint64(s.panes[n-1].events)
		}
		if n := len(s.runs); n > 0 {
			x += uint64(s.runs[n-1].c)
		}
	}
	return x
}

// rehave recomputes have after series were removed.
func (p *Patient) rehave() {
	p.have = 0
	for i := range p.series {
		p.have |= 1 << p.series[i].m
	}
}

// paneIndex returns the index of the pane starting at ps, inserting it.
func (s *series) paneIndex(ps int64, occ bool) int {
	n := len(s.panes)
	if n > 0 && s.panes[n-1].start == ps {
		return n - 1
	}
	var j int
	if n == 0 || s.panes[n-1].start < ps {
		j = n
	} else {
		var found bool
		j, found = slices.BinarySearchFunc(s.panes, ps, func(p pane, t int64) int { return cmpI64(p.start, t) })
		if found {
			return j
		}
	}
	off := uint32(len(s.runs))
	if j < n {
		off = s.panes[j].off
	}
	s.panes = slices.Insert(s.panes, j, pane{start: ps, off: off})
	if occ {
		s.x.occ = slices.Insert(s.x.occ, j, 0)
	}
	return j
}

// addAt adds a sample to pane j.
func (s *series) addAt(j int, t int64, k int32) {
	p := &s.panes[j]
	p.acc(t-p.start, t-p.start, k)
	lo, hi := int(p.off), int(p.off)+int(p.nr)
	r := s.runs[lo:hi]
	i, found := searchRuns(r, k)
	if found {
		r[i].c++
		return
	}
	s.runs = slices.Insert(s.runs, lo+i, run{k: k, c: 1})
	p.nr++
	for q := j + 1; q < len(s.panes); q++ {
		s.panes[q].off++
	}
}

// searchRuns returns the position of key k in sorted runs and whether it
// is there. A pane holds a few distinct values (vitals move by a few units
// a minute): a linear scan beats a binary search up to a dozen or so.
func searchRuns(r []run, k int32) (int, bool) {
	if len(r) > 16 {
		return slices.BinarySearchFunc(r, k, func(x run, k int32) int { return cmpI64(int64(x.k), int64(k)) })
	}
	for i := range r {
		if r[i].k >= k {
			return i, r[i].k == k
		}
	}
	return len(r), false
}

// acc adds key k at offset off (ms from start; x is off in the pane's x
// unit).
func (p *pane) acc(off, x int64, k int32) {
	if p.n == 0 {
		p.first, p.last, p.lastK = int32(off), int32(off), k
	} else {
		if int32(off) < p.first {
			p.first = int32(off)
		}
		if int32(off) >= p.last {
			p.last, p.lastK = int32(off), k
		}
	}
	kk := int64(k)
	p.n++
	p.sk += kk
	p.skk += kk * kk
	p.sx += x
	p.sxx += x * x
	p.sxy += x * kk
}

// rebase moves a session accumulator's start earlier by d ms (x in s).
func (p *pane) rebase(dMs int64) {
	d := dMs / 1000
	n := int64(p.n)
	p.sxy += d * p.sk
	p.sxx += 2*d*p.sx + n*d*d
	p.sx += n * d
	p.first += int32(dMs)
	p.last += int32(dMs)
	p.start -= dMs
}

// dropPanes removes the first n panes and their runs.
func (s *series) dropPanes(n int) {
	cut := uint32(len(s.runs))
	if n < len(s.panes) {
		cut = s.panes[n].off
	}
	s.runs = s.runs[:copy(s.runs, s.runs[cut:])]
	s.panes = s.panes[:copy(s.panes, s.panes[n:])]
	for i := range s.panes {
		s.panes[i].off -= cut
	}
	if s.x != nil && len(s.x.occ) > 0 {
		s.x.occ = s.x.occ[:copy(s.x.occ, s.x.occ[n:])]
	}
	if len(s.panes) == 0 && cap(s.panes) > 8 {
		s.panes, s.runs = nil, nil // give back the memory of a burst
	}
}

func insertTimed(xs []timed, x timed) []timed {
	i := len(xs)
	for i > 0 && xs[i-1].t > x.t {
		i--
	}
	return slices.Insert(xs, i, x)
}

func (e *Engine) addSession(p *Patient, s *series, m *metric, t int64, k int32) {
	gap := e.defs[m.session].gap
	defer func() { p.sessEnd = min(p.sessEnd, t+gap) }()
	for i := range s.x.sess {
		ss := &s.x.sess[i]
		a := &ss.acc
		if t >= a.start-gap && t < a.start+int64(a.last)+gap {
			if t < a.start {
				a.rebase(a.start - t)
			}
			a.acc(t-a.start, (t-a.start)/1000, k)
			j, found := slices.BinarySearchFunc(ss.runs, k, func(x run, k int32) int { return int(x.k) - int(k) })
			if found {
				ss.runs[j].c++
			} else {
				ss.runs = slices.Insert(ss.runs, j, run{k: k, c: 1})
			}
			return
		}
	}
	ss := session{acc: pane{start: t}, runs: []run{{k: k, c: 1}}}
	ss.acc.acc(0, 0, k)
	s.x.sess = append(s.x.sess, ss)
	slices.SortFunc(s.x.sess, func(a, b session) int { return cmpI64(a.acc.start, b.acc.start) })
}

// desatStep runs the desaturation detector over one SpO2 sample, in
// event-time order. The baseline of the samples of a pane is the (lower)
// median of the immediately preceding pane, taken when the detector enters
// the pane, and frozen while an event is in progress; with no preceding
// pane there is no baseline and nothing is detected. A sample is low when
// it is at least `drop` below the baseline; an event is a run of low
// samples with no gap above max_gap; it counts once, in the pane of the
// sample at which last-low minus first-low reaches min_duration.
func (e *Engine) desatStep(s *series, m *metric, x timed) {
	d := &s.x.desat
	cfg := m.desat
	if d.inEvent && x.t-d.eventLastLow > cfg.MaxGap.Milliseconds() {
		d.inEvent = false
	}
	ps := e.paneStart(x.t)
	if !d.started || ps != d.paneMs {
		if !d.inEvent {
			d.hasBase = false
			if d.started && ps-e.paneMs == d.paneMs {
				if j, ok := s.find(d.paneMs); ok {
					p := &s.panes[j]
					d.baseline = rankKey(s.runs[p.off:p.off+uint32(p.nr)], (uint64(p.n)-1)/2)
					d.hasBase = true
				}
			}
		}
		d.started, d.paneMs = true, ps
	}
	low := d.hasBase && float64(x.k) <= float64(d.baseline)-cfg.Drop*float64(m.scale)
	if !low {
		d.inEvent = false
		return
	}
	if !d.inEvent {
		d.inEvent, d.counted, d.eventStart = true, false, x.t
	}
	d.eventLastLow = x.t
	if !d.counted && d.eventLastLow-d.eventStart >= cfg.MinDuration.Milliseconds() {
		d.counted = true
		if j, ok := s.find(ps); ok {
			s.panes[j].events++
		}
	}
}

func (s *series) find(ps int64) (int, bool) {
	return slices.BinarySearchFunc(s.panes, ps, func(p pane, t int64) int { return cmpI64(p.start, t) })
}

// rankKey returns the key of 0-based rank r in sorted runs.
func rankKey(runs []run, r uint64) int32 {
	var c uint64
	for _, x := range runs {
		c += uint64(x.c)
		if r < c {
			return x.k
		}
	}
	return runs[len(runs)-1].k
}

// Stats are the features of one metric over one window.
type Stats struct {
	Count                          uint64
	Mean, Min, Max, Std, Last      float64
	FirstTime, LastTime, SinceLast int64
	Slope                          float64
	Median, P05, P25, P75, P95     float64
	Completeness                   float64
	HasDesat                       bool
	DesatEvents                    int
	ODI                            float64
	HasWear                        bool
	WearS                          float64
	HasHRV                         bool
	HRV                            hrv.Stats
}

// sums merges panes into window-level sums (slope sums in float64, fixed
// pane order: deterministic).
type sums struct {
	n            uint64
	sk, skk      int64
	sx, sxx, sxy float64
	first, last  int64
	lastK        int32
	events       int
}

// addPane adds pane p whose x origin is d (x units) after the window's.
func (s *sums) addPane(p *pane, d int64, _ []run) {
	n := int64(p.n)
	df := float64(d)
	if s.n == 0 || p.start+int64(p.first) < s.first {
		s.first = p.start + int64(p.first)
	}
	if lt := p.start + int64(p.last); s.n == 0 || lt >= s.last {
		s.last, s.lastK = lt, p.lastK
	}
	s.n += uint64(p.n)
	s.sk += p.sk
	s.skk += p.skk
	s.sx += float64(p.sx) + float64(n)*df
	s.sxx += float64(p.sxx) + 2*df*float64(p.sx) + float64(n)*df*df
	s.sxy += float64(p.sxy) + df*float64(p.sk)
	s.events += int(p.events)
}

// finish fills count, mean, std, last, times and slope; perMin is x units
// per minute.
func (s *sums) finish(st *Stats, scale int64, perMin float64, _ int64) {
	sc := float64(scale)
	n := float64(s.n)
	st.Count = s.n
	st.Mean = float64(s.sk) / n / sc
	st.Std = math.Sqrt(varNumerator(s.n, s.sk, s.skk)) / n / sc
	st.Last = float64(s.lastK) / sc
	st.FirstTime, st.LastTime = s.first, s.last
	if s.n >= 2 {
		den := n*s.sxx - s.sx*s.sx
		if den > 1e-12*n*s.sxx {
			st.Slope = (n*s.sxy - s.sx*float64(s.sk)) / den * perMin / sc
		}
	}
}

// varNumerator returns n*Σk² - (Σk)² exactly (128-bit) as a float64.
func varNumerator(n uint64, sk, skk int64) float64 {
	h1, l1 := bits.Mul64(n, uint64(skk))
	a := uint64(sk)
	if sk < 0 {
		a = uint64(-sk)
	}
	h2, l2 := bits.Mul64(a, a)
	l, borrow := bits.Sub64(l1, l2, 0)
	h, _ := bits.Sub64(h1, h2, borrow)
	if int64(h) < 0 {
		return 0
	}
	return float64(h)*(1<<64) + float64(l)
}

// windowStats computes the stats of series s over [start, end); false when
// it has no sample there.
func (e *Engine) windowStats(s *series, start, end int64, st *Stats, b *Batch) bool {
	*st = Stats{}
	var sm sums
	merged := b.merged[:0]
	first := true
	m := &e.metrics[s.m]
	var wearPrev int64 = math.MinInt64
	for j := range s.panes {
		p := &s.panes[j]
		if p.start < start {
			continue
		}
		if p.start >= end {
			break
		}
		sm.addPane(p, p.start-start, nil)
		r := s.runs[p.off : p.off+uint32(p.nr)]
		if first {
			merged = append(merged, r...)
			first = false
		} else {
			b.tmp = mergeRuns(b.tmp[:0], merged, r)
			merged, b.tmp = b.tmp, merged
		}
		if m.wearGapS > 0 {
			occ := s.x.occ[j]
			for occ != 0 {
				bit := int64(bits.TrailingZeros64(occ))
				occ &= occ - 1
				var sec int64
				if e.paneMs <= 64000 {
					sec = p.start/1000 + bit
				} else {
					sec = (p.start + bit*e.paneMs/64) / 1000
				}
				if wearPrev != math.MinInt64 && sec-wearPrev <= m.wearGapS {
					st.WearS += float64(sec - wearPrev)
				}
				wearPrev = sec
			}
		}
	}
	b.merged = merged
	if sm.n == 0 {
		return false
	}
	sm.finish(st, m.scale, 60000, start)
	e.finishStats(m, st, start, end, merged)
	st.HasWear = m.wearGapS > 0
	if m.desat != nil {
		st.HasDesat = true
		st.DesatEvents = sm.events
		st.ODI = float64(sm.events) / (float64(end-start) / 3.6e6)
	}
	if m.hrv {
		rr := b.rr[:0]
		for _, x := range s.x.seq {
			if x.t >= start && x.t < end {
				rr = append(rr, float64(x.k)/float64(m.scale))
			}
		}
		b.rr = rr
		st.HasHRV = true
		st.HRV = hrv.Compute(rr)
	}
	return true
}

// finishStats fills min, max, percentiles, completeness and time since
// last from the merged runs.
func (e *Engine) finishStats(m *metric, st *Stats, start, end int64, runs []run) {
	sc := float64(m.scale)
	st.Min = float64(runs[0].k) / sc
	st.Max = float64(runs[len(runs)-1].k) / sc
	st.Median = quantile(runs, st.Count, 0.5) / sc
	st.P05 = quantile(runs, st.Count, 0.05) / sc
	st.P25 = quantile(runs, st.Count, 0.25) / sc
	st.P75 = quantile(runs, st.Count, 0.75) / sc
	st.P95 = quantile(runs, st.Count, 0.95) / sc
	st.SinceLast = end - st.LastTime
	st.Completeness = -1
	if m.expectedMs > 0 {
		want := float64(end-start) / float64(m.expectedMs)
		st.Completeness = math.Min(1, float64(st.Count)/want)
	}
}

// quantile is the q-quantile of the n keys in runs, linear between ranks
// (numpy's default): h = (n-1)q, x[floor h] + (h - floor h)(x[floor h + 1]
// - x[floor h]).
func quantile(runs []run, n uint64, q float64) float64 {
	h := float64(n-1) * q
	lo := math.Floor(h)
	a := float64(rankKey(runs, uint64(lo)))
	if frac := h - lo; frac > 0 {
		b := float64(rankKey(runs, uint64(lo)+1))
		return a + frac*(b-a)
	}
	return a
}

// mergeRuns appends the merge of sorted runs a and b to dst.
func mergeRuns(dst, a, b []run) []run {
	i, j := 0, 0
	for i < len(a) && j < len(b) {
		switch {
		case a[i].k < b[j].k:
			dst = append(dst, a[i])
			i++
		case a[i].k > b[j].k:
			dst = append(dst, b[j])
			j++
		default:
			dst = append(dst, run{k: a[i].k, c: a[i].c + b[j].c})
			i++
			j++
		}
	}
	dst = append(dst, a[i:]...)
	return append(dst, b[j:]...)
}
