// Package window aggregates samples into tumbling event-time windows per
// metric: count, sum, min, max, last, first/last event time, Welford mean and
// M2 (population standard deviation) and the least-squares slope, all as
// running values, so that a window costs the same memory whatever its
// sample count.
//
// Windows are aligned to the Unix epoch: the window of event time t is
// [floor(t/size)*size, that+size). A Set holds the open windows of one key
// (one patient, every metric); it is plain data, serialisable to and from
// vigilv1.OpenWindow for the stream engine's changelog, and restoring a
// serialised Set continues bit-for-bit where the original was.
//
// Nothing here is safe for concurrent use: a Set belongs to the goroutine
// that owns its key.
package window

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"time"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// msPerMinute converts event-time milliseconds to the slope's x unit.
const msPerMinute = 60000.0

// Start returns the start (Unix ms) of the window of size sizeMs that holds
// event time t, aligned to the epoch (floor division, so times before 1970
// align too).
func Start(t, sizeMs int64) int64 {
	s := t / sizeMs * sizeMs
	if s > t { // negative t: Go truncates toward zero
		s -= sizeMs
	}
	return s
}

// Agg is the running aggregate of one metric over one window [Start, End).
// The zero Agg is empty; Add the first sample to start it.
type Agg struct {
	Metric string
	Unit   string
	// Start and End bound the window in event time, Unix ms, [Start, End).
	Start, End int64
	Count      uint64
	Sum        float64
	Min, Max   float64
	// Last is the value of the sample with the greatest event time (ties:
	// the one added last); LastTime is that event time.
	Last      float64
	LastTime  int64
	FirstTime int64
	// Mean and M2 are Welford's running mean and sum of squared deviations.
	Mean, M2 float64
	// SumX, SumXX and SumXY are least-squares sums with x in minutes since
	// Start and y the value (Sum is the sum of y).
	SumX, SumXX, SumXY float64
}

// Add adds the sample (event time t in Unix ms, value v). It does not check
// that t lies in the window: the caller chose the window.
func (a *Agg) Add(t int64, v float64) {
	a.Count++
	if a.Count == 1 {
		a.Min, a.Max = v, v
		a.FirstTime, a.LastTime, a.Last = t, t, v
	} else {
		if v < a.Min {
			a.Min = v
		}
		if v > a.Max {
			a.Max = v
		}
		if t < a.FirstTime {
			a.FirstTime = t
		}
		if t >= a.LastTime {
			a.LastTime, a.Last = t, v
		}
	}
	a.Sum += v
	d := v - a.Mean
	a.Mean += d / float64(a.Count)
	a.M2 += d * (v - a.Mean)
	x := float64(t-a.Start) / msPerMinute
	a.SumX += x
	a.SumXX += x * x
	a.SumXY += x * v
}

// Std returns the population standard deviation (0 when empty).
func (a *Agg) Std() float64 {
	if a.Count == 0 {
		return 0
	}
	return math.Sqrt(a.M2 / float64(a.Count))
}

// Slope returns the least-squares slope of value over event time, in unit
// per minute; 0 with fewer than two samples or when all samples share one
// event time.
func (a *Agg) Slope() float64 {
	if a.Count < 2 {
		return 0
	}
	n := float64(a.Count)
	den := n*a.SumXX - a.SumX*a.SumX
	// With every x equal den is 0 up to rounding; relative to the scale
	// of the sums that is no spread at all.
	if den <= 1e-12*n*a.SumXX {
		return 0
	}
	return (n*a.SumXY - a.SumX*a.Sum) / den
}

// Feature returns the window's feature. expected is the metric's nominal
// sampling interval, for completeness (count over expected count, capped at
// 1); 0 means unknown and gives completeness -1. Median and percentiles are
// not computed by the running aggregate and are left 0.
func (a *Agg) Feature(expected time.Duration) *vigilv1.Feature {
	f := &vigilv1.Feature{}
	a.FillFeature(f, expected)
	return f
}

// FillFeature is Feature writing into f (to reuse allocations).
func (a *Agg) FillFeature(f *vigilv1.Feature, expected time.Duration) {
	f.Metric = a.Metric
	f.Unit = a.Unit
	f.Count = a.Count
	f.Mean = a.Mean
	f.Min = a.Min
	f.Max = a.Max
	f.Std = a.Std()
	f.Last = a.Last
	f.LastTimeMs = a.LastTime
	f.FirstTimeMs = a.FirstTime
	f.SlopePerMin = a.Slope()
	f.Completeness = -1
	if expected > 0 {
		want := float64(a.End-a.Start) / float64(expected.Milliseconds())
		f.Completeness = math.Min(1, float64(a.Count)/want)
	}
}

// Set is the open windows of one key: every metric, every open window.
// The zero Set is unusable; make one with NewSet.
type Set struct {
	sizeMs int64
	aggs   []Agg
	closed []Agg // scratch for Close, reused
}

// NewSet returns an empty Set of tumbling windows of the given size (a
// whole number of milliseconds, positive).
func NewSet(size time.Duration) *Set {
	ms := size.Milliseconds()
	if ms <= 0 {
		panic(fmt.Sprintf("window: size %s is not a positive number of milliseconds", size))
	}
	return &Set{sizeMs: ms}
}

// SizeMs returns the window size in milliseconds.
func (s *Set) SizeMs() int64 { return s.sizeMs }

// Len returns the number of open (metric, window) aggregates.
func (s *Set) Len() int { return len(s.aggs) }

// Add adds the sample to the window of its event time, opening it if
// needed. unit is recorded when the window opens.
func (s *Set) Add(metric, unit string, t int64, v float64) {
	start := Start(t, s.sizeMs)
	for i := range s.aggs {
		a := &s.aggs[i]
		if a.Start == start && a.Metric == metric {
			a.Add(t, v)
			return
		}
	}
	s.aggs = append(s.aggs, Agg{Metric: metric, Unit: unit, Start: start, End: start + s.sizeMs})
	s.aggs[len(s.aggs)-1].Add(t, v)
}

// MinEnd returns the smallest end of an open window, and false when there
// is none.
func (s *Set) MinEnd() (int64, bool) {
	if len(s.aggs) == 0 {
		return 0, false
	}
	m := s.aggs[0].End
	for i := range s.aggs[1:] {
		m = min(m, s.aggs[i+1].End)
	}
	return m, true
}

// Close closes every window whose end is at or before watermark, calling
// fn once per window end, in increasing end order, with that window's
// aggregates sorted by metric. The slice passed to fn is only valid during
// the call. It returns the number of window ends closed.
func (s *Set) Close(watermark int64, fn func(start, end int64, aggs []Agg)) int {
	s.closed = s.closed[:0]
	kept := s.aggs[:0]
	for _, a := range s.aggs {
		if a.End <= watermark {
			s.closed = append(s.closed, a)
		} else {
			kept = append(kept, a)
		}
	}
	clear(s.aggs[len(kept):]) // drop string references of moved entries
	s.aggs = kept
	if len(s.closed) == 0 {
		return 0
	}
	slices.SortFunc(s.closed, func(a, b Agg) int {
		if c := cmp.Compare(a.End, b.End); c != 0 {
			return c
		}
		return cmp.Compare(a.Metric, b.Metric)
	})
	groups := 0
	for i := 0; i < len(s.closed); {
		j := i + 1
		for j < len(s.closed) && s.closed[j].End == s.closed[i].End {
			j++
		}
		fn(s.closed[i].Start, s.closed[i].End, s.closed[i:j])
		groups++
		i = j
	}
	clear(s.closed)
	return groups
}

// AppendProto appends the open windows as changelog entries, sorted by
// start then metric, and returns the extended slice.
func (s *Set) AppendProto(dst []*vigilv1.OpenWindow) []*vigilv1.OpenWindow {
	from := len(dst)
	for i := range s.aggs {
		a := &s.aggs[i]
		dst = append(dst, &vigilv1.OpenWindow{
			Metric: a.Metric, Unit: a.Unit, StartMs: a.Start, EndMs: a.End,
			Count: a.Count, Sum: a.Sum, Min: a.Min, Max: a.Max,
			Last: a.Last, LastTimeMs: a.LastTime, FirstTimeMs: a.FirstTime,
			Mean: a.Mean, M2: a.M2, SumX: a.SumX, SumXx: a.SumXX, SumXy: a.SumXY,
		})
	}
	slices.SortFunc(dst[from:], func(a, b *vigilv1.OpenWindow) int {
		if c := cmp.Compare(a.StartMs, b.StartMs); c != 0 {
			return c
		}
		return cmp.Compare(a.Metric, b.Metric)
	})
	return dst
}

// Restore replaces the Set's windows with ws (from AppendProto). It fails
// when an entry does not match the Set's window size or alignment, or is
// empty: a changelog written with another window size cannot be continued.
func (s *Set) Restore(ws []*vigilv1.OpenWindow) error {
	s.aggs = s.aggs[:0]
	for i, w := range ws {
		if w.GetEndMs()-w.GetStartMs() != s.sizeMs || Start(w.GetStartMs(), s.sizeMs) != w.GetStartMs() {
			return fmt.Errorf("restoring window %d (%s [%d, %d)): not a %d ms epoch-aligned window",
				i, w.GetMetric(), w.GetStartMs(), w.GetEndMs(), s.sizeMs)
		}
		if w.GetCount() == 0 || w.GetMetric() == "" {
			return fmt.Errorf("restoring window %d (%s [%d, %d)): empty", i, w.GetMetric(), w.GetStartMs(), w.GetEndMs())
		}
		s.aggs = append(s.aggs, Agg{
			Metric: w.GetMetric(), Unit: w.GetUnit(), Start: w.GetStartMs(), End: w.GetEndMs(),
			Count: w.GetCount(), Sum: w.GetSum(), Min: w.GetMin(), Max: w.GetMax(),
			Last: w.GetLast(), LastTime: w.GetLastTimeMs(), FirstTime: w.GetFirstTimeMs(),
			Mean: w.GetMean(), M2: w.GetM2(), SumX: w.GetSumX(), SumXX: w.GetSumXx(), SumXY: w.GetSumXy(),
		})
	}
	return nil
}
