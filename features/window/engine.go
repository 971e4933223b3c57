package window

import (
	"fmt"
	"math"
	"slices"
	"time"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// This file is the event-time window engine: per patient, per metric,
// samples go into panes (epoch-aligned slices of event time whose length is
// the greatest common divisor of every tumbling/hopping size and step of the
// spec); a tumbling or hopping window is the merge of the panes it covers,
// so a 5-minute window hopping by 1 minute costs five 1-minute panes, not
// five copies of every sample. Session windows keep one running pane per
// metric.
//
// Memory and exact percentiles. A pane keeps integer sums (count, Σk, Σk²,
// Σx, Σx², Σxk with k the value at the metric's resolution, x the offset in
// ms from the pane start) and the distinct keys with their counts as a
// sorted run in one arena per metric. Vitals at 1 Hz take a handful of
// distinct values a minute (HR 70..78 is 9 runs), so a pane costs 72 bytes
// plus 8 per distinct value, and percentiles, median, min and max are exact
// at the device's resolution. Integer sums make pane merges exact and
// independent of arrival order; mean and variance come out of them exactly
// (variance through a 128-bit numerator).
//
// Watermarks. A patient's watermark is max(previous watermark, max event
// time seen - out_of_orderness); Advance closes every window whose end is at
// or before it. A sample whose pane ended allowed_lateness or more before
// the watermark is too late (Add says so; the caller dead-letters it);
// otherwise it is added, and every already closed window containing it is
// re-emitted at the next Advance with version+1 (a correction). Panes are
// dropped when no window containing them can be emitted or corrected again.
// A sample is in all of its windows or in none: it is too late when its
// pane (so its shortest window) closed allowed_lateness or more before the
// watermark. Nothing here reads a clock: the caller decides, on processing
// time, that a patient is idle (Idle) or that the stage stops (Flush).

// noEvent is the watermark/max event time of a patient without data.
const noEvent = math.MinInt64

// Options are the engine's event-time settings.
type Options struct {
	// OutOfOrderness is how far behind the newest event time the watermark
	// trails.
	OutOfOrderness time.Duration
	// AllowedLateness is how long after its window closed a sample still
	// corrects it.
	AllowedLateness time.Duration
}

// MetricInfo is what the caller tells the engine about a metric (from the
// metric catalogue).
type MetricInfo struct {
	Unit string
	// ExpectedInterval is the nominal sampling interval, for completeness
	// (0: unknown, completeness -1).
	ExpectedInterval time.Duration
}

type kind uint8

const (
	kindTumbling kind = iota + 1
	kindHopping
	kindSession
)

func (k kind) proto() vigilv1.WindowKind {
	switch k {
	case kindTumbling:
		return vigilv1.WindowKind_WINDOW_KIND_TUMBLING
	case kindHopping:
		return vigilv1.WindowKind_WINDOW_KIND_HOPPING
	}
	return vigilv1.WindowKind_WINDOW_KIND_SESSION
}

type def struct {
	name                          string
	kind                          kind
	sizeMs, stepMs, gap           int64
	metrics                       uint64 // bitmask over metric index
	dMAP, dPP, dSI                bool
	idxMAP, idxSBP, idxDBP, idxHR int // -1 when not in the spec
}

type metric struct {
	name       string
	unit       string
	scale      int64 // 10^decimals
	expectedMs int64
	spanMs     int64 // largest tumbling/hopping size covering the metric (0: none)
	defs       uint32
	session    int // def index of its session window, -1
	desat      *DesatSpec
	wearGapS   int64 // 0: no wear time
	hrv        bool
}

// Engine is a compiled window spec. It is immutable and safe for concurrent
// use; the per-patient state (Patient) and the output (Batch) are not.
type Engine struct {
	spec    *Spec
	opts    Options
	paneMs  int64
	oooMs   int64
	lateMs  int64
	metrics []metric // sorted by name
	defs    []def
	byName  map[string]int
}

// Compile builds an Engine. info gives unit and expected interval per
// metric (metrics it does not know get an empty unit and completeness -1).
func Compile(spec *Spec, opts Options, info func(metric string) (MetricInfo, bool)) (*Engine, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	if opts.OutOfOrderness < 0 || opts.AllowedLateness < 0 {
		return nil, fmt.Errorf("window engine: out-of-orderness and allowed lateness must not be negative")
	}
	e := &Engine{spec: spec, opts: opts, paneMs: spec.paneMs(), oooMs: opts.OutOfOrderness.Milliseconds(),
		lateMs: opts.AllowedLateness.Milliseconds(), byName: map[string]int{}}
	if e.paneMs == 0 {
		e.paneMs = 60000 // sessions only: panes unused, any value works
	}
	for i, name := range spec.sortedMetrics() {
		ms := spec.Metrics[name]
		m := metric{name: name, scale: pow10(ms.Decimals), session: -1, desat: ms.Desaturation, hrv: ms.HRV}
		if mi, ok := info(name); ok {
			m.unit = mi.Unit
			m.expectedMs = mi.ExpectedInterval.Milliseconds()
		}
		if ms.WearTime != nil {
			m.wearGapS = int64(ms.WearTime.MaxGap / time.Second)
		}
		e.metrics = append(e.metrics, m)
		e.byName[name] = i
	}
	idx := func(n string) int {
		if i, ok := e.byName[n]; ok {
			return i
		}
		return -1
	}
	for di, ws := range spec.Windows {
		d := def{name: ws.Name, idxMAP: idx("mean_arterial_pressure"), idxSBP: idx("systolic_bp"),
			idxDBP: idx("diastolic_bp"), idxHR: idx("heart_rate")}
		switch ws.Kind {
		case "tumbling":
			d.kind, d.sizeMs, d.stepMs = kindTumbling, ws.Size.Milliseconds(), ws.Size.Milliseconds()
		case "hopping":
			d.kind, d.sizeMs, d.stepMs = kindHopping, ws.Size.Milliseconds(), ws.Step.Milliseconds()
		case "session":
			d.kind, d.gap = kindSession, ws.Gap.Milliseconds()
		}
		for _, n := range ws.Metrics {
			mi := e.byName[n]
			d.metrics |= 1 << mi
			m := &e.metrics[mi]
			m.defs |= 1 << di
			if d.kind == kindSession {
				m.session = di
			} else {
				m.spanMs = max(m.spanMs, d.sizeMs)
			}
		}
		for _, x := range ws.Derived {
			switch x {
			case DerivedMAP:
				d.dMAP = true
			case DerivedPulsePressure:
				d.dPP = true
			case DerivedShockIndex:
				d.dSI = true
			}
		}
		e.defs = append(e.defs, d)
	}
	return e, nil
}

// Spec returns the spec the engine was compiled from.
func (e *Engine) Spec() *Spec { return e.spec }

// PaneMs returns the pane length in ms.
func (e *Engine) PaneMs() int64 { return e.paneMs }

// Metric returns the index of a metric the spec windows, for Add. It
// compares strings without hashing (the spec has few metrics).
func (e *Engine) Metric(name string) (int, bool) {
	for i := range e.metrics {
		if len(e.metrics[i].name) == len(name) && e.metrics[i].name == name {
			return i, true
		}
	}
	return -1, false
}

// MetricName returns the name of metric index i.
func (e *Engine) MetricName(i int) string { return e.metrics[i].name }

// paneStart is Start(t, paneMs).
func (e *Engine) paneStart(t int64) int64 { return Start(t, e.paneMs) }

// quantise returns v at the metric's resolution, half away from zero, and
// false when it does not fit the key range.
func quantise(v float64, scale int64) (int32, bool) {
	k := math.Round(v * float64(scale))
	if k > math.MaxInt32 || k < math.MinInt32 || math.IsNaN(k) {
		return 0, false
	}
	return int32(k), true
}

// AddResult says what Add did with a sample.
type AddResult uint8

const (
	// Added: the sample is in its windows.
	Added AddResult = iota
	// TooLate: its pane ended allowed_lateness or more before the
	// watermark; nothing changed.
	TooLate
	// OutOfRange: the value does not fit the metric's resolution range,
	// or the event time is beyond ±2^50 ms of the epoch.
	OutOfRange
	// NotWindowed: the metric is in no window of the spec.
	NotWindowed
)

// Add adds one sample (metric index from Metric, event time t in Unix ms,
// value v) to p. It does not move the watermark: call Advance after the
// batch.
func (e *Engine) Add(p *Patient, mi int, t int64, v float64) AddResult {
	m := &e.metrics[mi]
	if !inTimeRange(t) {
		return OutOfRange
	}
	if m.defs == 0 {
		p.maxEvent = max(p.maxEvent, t)
		return NotWindowed
	}
	k, ok := quantise(v, m.scale)
	if !ok {
		return OutOfRange
	}
	ps := e.paneStart(t)
	if p.wm != noEvent && ps+e.paneMs+e.lateMs <= p.wm {
		return TooLate
	}
	s := p.seriesFor(mi, m.desat != nil || m.wearGapS > 0 || m.hrv || m.session >= 0)
	if m.spanMs > 0 {
		if p.wm != noEvent && ps+e.paneMs <= p.wm {
			e.markCorrections(p, s, mi, ps)
		}
		j := s.paneIndex(ps, m.wearGapS > 0)
		s.addAt(j, t, k)
		if m.wearGapS > 0 {
			s.x.occ[j] |= occBit(t-ps, e.paneMs)
		}
		if m.hrv {
			s.x.seq = insertTimed(s.x.seq, timed{t, k})
		}
		if m.desat != nil && (p.wm == noEvent || t > p.wm) {
			d := &s.x.desat
			d.pending = insertTimed(d.pending, timed{t, k})
			if len(d.pending) > maxPendingDesat {
				// Bounded: process the oldest now (it is at most
				// out_of_orderness early; documented).
				e.desatStep(s, m, d.pending[0])
				d.pending = slices.Delete(d.pending, 0, 1)
			}
		}
	}
	if m.session >= 0 && (p.wm == noEvent || t > p.wm) {
		e.addSession(p, s, m, t, k)
	}
	p.maxEvent = max(p.maxEvent, t)
	return Added
}

const maxPendingDesat = 256

// markCorrections records every closed window of metric mi containing pane
// ps for re-emission, before the sample is added.
func (e *Engine) markCorrections(p *Patient, s *series, mi int, ps int64) {
	m := &e.metrics[mi]
	for di := range e.defs {
		d := &e.defs[di]
		if m.defs&(1<<di) == 0 || d.kind == kindSession {
			continue
		}
		// Windows [W, W+size) with W = j*step, W <= ps < W+size.
		for w := Start(ps, d.stepMs); w > ps-d.sizeMs; w -= d.stepMs {
			end := w + d.sizeMs
			if end > p.wm {
				continue // still open
			}
			found := false
			for _, c := range p.pending {
				if c.def == uint8(di) && c.end == end {
					found = true
					break
				}
			}
			if !found {
				p.pending = append(p.pending, pendingWin{def: uint8(di), end: end, emitted: p.hasData(e, d, w, end)})
			}
		}
	}
}

// hasData reports whether window [start, end) of d holds any sample.
func (p *Patient) hasData(e *Engine, d *def, start, end int64) bool {
	for i := range p.series {
		s := &p.series[i]
		if d.metrics&(1<<s.m) == 0 {
			continue
		}
		for j := range s.panes {
			if st := s.panes[j].start; st >= start && st < end {
				return true
			}
		}
	}
	return false
}

func occBit(off, paneMs int64) uint64 {
	if paneMs <= 64000 {
		return 1 << uint(off/1000)
	}
	return 1 << uint(off*64/paneMs)
}

// Advance moves p's watermark to max(current, newest event time -
// out_of_orderness) and appends to b, as rows of the patient
// (tenant, patient), every window that closed and every correction of a
// window a late sample changed since the last Advance.
func (e *Engine) Advance(p *Patient, b *Batch, tenant, patient string) {
	wm := p.wm
	if p.maxEvent != noEvent {
		wm = max(wm, p.maxEvent-e.oooMs)
	}
	e.advanceTo(p, wm, b, tenant, patient)
}

// Flush closes every open window of p (the idle timeout, or shutdown with
// flush_on_shutdown): the watermark moves to the end of the last open
// window. Later samples continue with the moved watermark.
func (e *Engine) Flush(p *Patient, b *Batch, tenant, patient string) {
	if p.maxEvent == noEvent {
		return
	}
	wm := max(p.wm, p.maxEvent-e.oooMs)
	for i := range p.series {
		s := &p.series[i]
		m := &e.metrics[s.m]
		if len(s.panes) > 0 {
			wm = max(wm, s.panes[len(s.panes)-1].start+m.spanMs)
		}
		if s.x != nil {
			for _, ss := range s.x.sess {
				wm = max(wm, ss.acc.start+int64(ss.acc.last)+e.defs[m.session].gap)
			}
		}
		if s.x != nil && len(s.x.desat.pending) > 0 {
			wm = max(wm, s.x.desat.pending[len(s.x.desat.pending)-1].t)
		}
	}
	// Round up to a pane boundary so every window ending by then closes.
	wm = Start(wm+e.paneMs-1, e.paneMs)
	e.advanceTo(p, wm, b, tenant, patient)
}

// Touch records the event time t of a sample of a metric the spec does not
// know, so that the patient's watermark follows every sample it sends.
func (e *Engine) Touch(p *Patient, t int64) {
	if inTimeRange(t) {
		p.maxEvent = max(p.maxEvent, t)
	}
}

// Idle closes the windows of a patient that has sent nothing for longer
// than the caller's idle timeout (processing time, read from the caller's
// clock: the engine reads none). Every open window closes as with Flush;
// then the watermark moves on to newest event time - out_of_orderness +
// overdue, overdue being how long past the timeout the patient has been
// silent, so that the panes kept for allowed lateness are dropped once the
// silence outlasts it too. It appends what closes to b and reports whether
// the watermark moved.
func (e *Engine) Idle(p *Patient, b *Batch, tenant, patient string, overdue time.Duration) bool {
	if p.maxEvent == noEvent || overdue < 0 {
		return false
	}
	old := p.wm
	e.Flush(p, b, tenant, patient)
	// Move on only when that drops state: a watermark that crept on
	// without changing anything would cost the caller a state write at
	// every look at the patient.
	if to := p.maxEvent - e.oooMs + overdue.Milliseconds(); to >= e.nextDrop(p) {
		e.advanceTo(p, to, b, tenant, patient)
	}
	return p.wm != old
}

// nextDrop returns the lowest watermark at which advanceTo drops a pane or
// forgets a correction of p (math.MaxInt64 when it holds neither).
func (e *Engine) nextDrop(p *Patient) int64 {
	at := int64(math.MaxInt64)
	for i := range p.series {
		s := &p.series[i]
		if len(s.panes) > 0 {
			at = min(at, s.panes[0].start+e.metrics[s.m].spanMs+e.lateMs)
		}
	}
	for _, c := range p.corr {
		at = min(at, c.end+e.lateMs)
	}
	return at
}

// Watermark returns p's watermark (math.MinInt64 before any sample).
func (p *Patient) Watermark() int64 { return p.wm }

// MaxEventTime returns the newest event time added (math.MinInt64 before
// any sample).
func (p *Patient) MaxEventTime() int64 { return p.maxEvent }

func (e *Engine) advanceTo(p *Patient, wm int64, b *Batch, tenant, patient string) {
	old := p.wm
	if wm <= old && len(p.pending) == 0 {
		return
	}
	wm = max(wm, old)
	// 1. SpO2 detector: pending samples up to the watermark, in order
	//    (before windows close: an event counts in the pane where it
	//    qualified, which is still open). Done at every move of the
	//    watermark, so that pending holds at most out_of_orderness of
	//    samples.
	for i := range p.series {
		s := &p.series[i]
		if s.x == nil || len(s.x.desat.pending) == 0 || s.x.desat.pending[0].t > wm {
			continue
		}
		d := &s.x.desat
		n := 0
		for n < len(d.pending) && d.pending[n].t <= wm {
			e.desatStep(s, &e.metrics[s.m], d.pending[n])
			n++
		}
		d.pending = d.pending[:copy(d.pending, d.pending[n:])]
	}
	// Fast path: every tumbling/hopping end is a pane boundary; when none
	// was crossed, no correction is pending and no session can end, only
	// the watermark moves (purging waits for the next boundary: same
	// results).
	if old != noEvent && len(p.pending) == 0 && wm < p.sessEnd && Start(wm, e.paneMs) == Start(old, e.paneMs) {
		p.wm = wm
		return
	}
	// 2. Windows to emit: corrections of windows closed before, and
	//    windows closing now.
	wins := b.wins[:0]
	for _, c := range p.pending {
		d := &e.defs[c.def]
		ver := uint32(1)
		if c.emitted {
			ver = p.nextVersion(c.def, c.end)
		}
		wins = append(wins, winRef{def: c.def, start: c.end - d.sizeMs, end: c.end, version: ver})
	}
	p.pending = p.pending[:0]
	if old == noEvent {
		old = math.MinInt64 + 1
	}
	for di := range e.defs {
		d := &e.defs[di]
		if d.kind == kindSession {
			continue
		}
		from := len(wins)
		for i := range p.series {
			s := &p.series[i]
			if d.metrics&(1<<s.m) == 0 {
				continue
			}
			for j := range s.panes {
				ps := s.panes[j].start
				// Windows containing the pane: W = j*step in (ps-size, ps].
				for w := Start(ps, d.stepMs); w > ps-d.sizeMs; w -= d.stepMs {
					end := w + d.sizeMs
					if end > old && end <= wm {
						wins = append(wins, winRef{def: uint8(di), start: w, end: end, version: 1})
					}
				}
			}
		}
		// Dedupe this def's ends.
		part := wins[from:]
		slices.SortFunc(part, cmpWin)
		part = slices.CompactFunc(part, func(a, b winRef) bool { return a.end == b.end })
		wins = wins[:from+len(part)]
	}
	slices.SortFunc(wins, cmpWin)
	b.wins = wins
	for _, w := range wins {
		e.emitWindow(p, b, tenant, patient, w, wm)
	}
	// 3. Sessions whose gap passed.
	p.sessEnd = math.MaxInt64
	for i := range p.series {
		s := &p.series[i]
		if s.x == nil || len(s.x.sess) == 0 {
			continue
		}
		m := &e.metrics[s.m]
		d := &e.defs[m.session]
		s.x.sess = slices.DeleteFunc(s.x.sess, func(ss session) bool {
			if end := ss.acc.start + int64(ss.acc.last) + d.gap; end > wm {
				p.sessEnd = min(p.sessEnd, end)
				return false
			}
			e.emitSession(s, &ss, b, tenant, patient, m.session, wm)
			return true
		})
	}
	p.wm = wm
	// 4. Drop what can no longer be emitted or corrected.
	for i := range p.series {
		s := &p.series[i]
		m := &e.metrics[s.m]
		n := 0
		for n < len(s.panes) && s.panes[n].start+m.spanMs+e.lateMs <= wm {
			n++
		}
		if n > 0 {
			s.dropPanes(n)
		}
		if s.x != nil && m.hrv {
			cut := int64(math.MaxInt64)
			if len(s.panes) > 0 {
				cut = s.panes[0].start
			}
			k := 0
			for k < len(s.x.seq) && s.x.seq[k].t < cut {
				k++
			}
			s.x.seq = slices.Delete(s.x.seq, 0, k)
		}
	}
	p.series = slices.DeleteFunc(p.series, func(s series) bool {
		if len(s.panes) > 0 {
			return false
		}
		if s.x == nil {
			return true
		}
		// An event in progress ends at the next sample anyway once
		// max_gap has passed: forget it then.
		d := &s.x.desat
		eventOver := !d.inEvent || wm-d.eventLastLow > e.metrics[s.m].desat.MaxGap.Milliseconds()
		return len(s.x.sess) == 0 && len(d.pending) == 0 && eventOver
	})
	p.rehave()
	p.corr = slices.DeleteFunc(p.corr, func(c correction) bool { return c.end+e.lateMs <= wm })
}

func cmpWin(a, b winRef) int {
	switch {
	case a.end != b.end:
		return cmpI64(a.end, b.end)
	case a.def != b.def:
		return int(a.def) - int(b.def)
	}
	return int(a.version) - int(b.version)
}

func cmpI64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func (p *Patient) nextVersion(di uint8, end int64) uint32 {
	for i := range p.corr {
		if p.corr[i].def == di && p.corr[i].end == end {
			p.corr[i].version++
			return p.corr[i].version
		}
	}
	p.corr = append(p.corr, correction{def: di, end: end, version: 2})
	return 2
}

// emitWindow appends the rows of window w: one per metric with data,
// sorted by metric name, then the derived ones.
func (e *Engine) emitWindow(p *Patient, b *Batch, tenant, patient string, w winRef, wm int64) {
	d := &e.defs[w.def]
	hdr := rowHeader{tenant: tenant, patient: patient, window: d.name, kind: d.kind.proto(), sizeMs: d.sizeMs,
		stepMs: d.stepMs, startMs: w.start, endMs: w.end, version: w.version, watermarkMs: wm}
	var have [maxMetrics]*Stats
	n := 0
	for i := range p.series { // series are sorted by metric index = name order
		s := &p.series[i]
		if d.metrics&(1<<s.m) == 0 {
			continue
		}
		st := &b.stats[n]
		if !e.windowStats(s, w.start, w.end, st, b) {
			continue
		}
		have[s.m] = st
		n++
		b.appendRow(&hdr, &e.metrics[s.m], st, false)
	}
	if n == 0 {
		return
	}
	get := func(i int) *Stats {
		if i < 0 {
			return nil
		}
		return have[i]
	}
	sbp, dbp, hr := get(d.idxSBP), get(d.idxDBP), get(d.idxHR)
	if d.dMAP && get(d.idxMAP) == nil && sbp != nil && dbp != nil {
		b.appendDerived(&hdr, DerivedMAP, "mm[Hg]", min(sbp.Count, dbp.Count),
			dbp.Mean+(sbp.Mean-dbp.Mean)/3, dbp.Last+(sbp.Last-dbp.Last)/3)
	}
	if d.dPP && sbp != nil && dbp != nil {
		b.appendDerived(&hdr, DerivedPulsePressure, "mm[Hg]", min(sbp.Count, dbp.Count), sbp.Mean-dbp.Mean, sbp.Last-dbp.Last)
	}
	if d.dSI && sbp != nil && hr != nil && sbp.Mean != 0 && sbp.Last != 0 {
		b.appendDerived(&hdr, DerivedShockIndex, "1", min(sbp.Count, hr.Count), hr.Mean/sbp.Mean, hr.Last/sbp.Last)
	}
}

// emitSession appends the row of a closed session window: [first sample,
// last sample + gap).
func (e *Engine) emitSession(s *series, ss *session, b *Batch, tenant, patient string, di int, wm int64) {
	d := &e.defs[di]
	m := &e.metrics[s.m]
	a := &ss.acc
	start, end := a.start, a.start+int64(a.last)+d.gap
	hdr := rowHeader{tenant: tenant, patient: patient, window: d.name, kind: d.kind.proto(), sizeMs: end - start,
		startMs: start, endMs: end, version: 1, watermarkMs: wm}
	st := &b.stats[0]
	*st = Stats{}
	var sm sums
	sm.addPane(a, 0, ss.runs)
	// Session sums have x in whole seconds.
	sm.finish(st, m.scale, 60, start)
	e.finishStats(m, st, start, end, ss.runs)
	b.appendRow(&hdr, m, st, false)
}
