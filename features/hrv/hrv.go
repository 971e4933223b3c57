// Package hrv computes time-domain heart-rate variability over NN intervals
// (normal-to-normal RR intervals, milliseconds, in beat order) as the Task
// Force of the European Society of Cardiology and the North American Society
// of Pacing and Electrophysiology defined them (Circulation 1996;93:1043-65):
//
//   - MeanNN: mean of the NN intervals (ms).
//   - SDNN: sample standard deviation of the NN intervals, divisor n-1 (ms).
//   - RMSSD: square root of the mean of the squared differences between
//     successive NN intervals (ms); n intervals give n-1 differences.
//   - PNN50: share of successive differences whose absolute value exceeds
//     50 ms, in PERCENT (0..100) of the n-1 differences, as the Task Force
//     states it ("pNN50 %"). NN50 = PNN50/100 * (N-1).
//
// Intervals are taken as given: the caller removes ectopic beats and
// artefacts (filtering to NN) before calling. Values that are not finite or
// not positive are skipped by Compute and Acc.Add, so that a corrupt interval
// cannot poison a window; a skipped value also breaks the chain of successive
// differences (the next difference is taken across it, as if it had not
// been there).
//
// Nothing here allocates; Stats and Acc are plain values, and nothing is safe
// for concurrent use on the same Acc.
package hrv

import "math"

// Stats is the time-domain HRV of a run of NN intervals. With N < 2 the
// spread measures (SDNN, RMSSD, PNN50) are 0; with N == 0 MeanNN is 0 too.
type Stats struct {
	// N is the number of NN intervals used.
	N int
	// MeanNN is the mean NN interval, ms.
	MeanNN float64
	// SDNN is the sample standard deviation (n-1) of the NN intervals, ms.
	SDNN float64
	// RMSSD is the root mean square of successive differences, ms.
	RMSSD float64
	// PNN50 is the percentage (0..100) of successive differences > 50 ms.
	PNN50 float64
}

// valid reports whether rr can be an RR interval at all.
func valid(rr float64) bool { return rr > 0 && !math.IsInf(rr, 1) }

// Compute returns the time-domain HRV of rrMs (NN intervals in ms, in beat
// order). It reads rrMs twice (mean first, then deviations, for accuracy)
// and does not allocate or keep rrMs.
func Compute(rrMs []float64) Stats {
	var s Stats
	var sum float64
	for _, rr := range rrMs {
		if valid(rr) {
			s.N++
			sum += rr
		}
	}
	if s.N == 0 {
		return s
	}
	s.MeanNN = sum / float64(s.N)
	if s.N < 2 {
		return s
	}
	var m2, sq float64
	var over int
	prev, havePrev := 0.0, false
	for _, rr := range rrMs {
		if !valid(rr) {
			continue
		}
		d := rr - s.MeanNN
		m2 += d * d
		if havePrev {
			dd := rr - prev
			sq += dd * dd
			if math.Abs(dd) > 50 {
				over++
			}
		}
		prev, havePrev = rr, true
	}
	nd := float64(s.N - 1)
	s.SDNN = math.Sqrt(m2 / nd)
	s.RMSSD = math.Sqrt(sq / nd)
	s.PNN50 = 100 * float64(over) / nd
	return s
}

// Acc accumulates the same statistics incrementally, in constant memory
// (Welford's update for the mean and variance), for stream windows that see
// one interval at a time. The zero value is empty and ready to use. Its
// result equals Compute's over the same intervals up to floating-point
// rounding.
type Acc struct {
	n      int
	mean   float64
	m2     float64
	last   float64
	sqDiff float64
	over50 int
}

// Add takes the next NN interval (ms) in beat order; values that are not
// finite or not positive are ignored.
func (a *Acc) Add(rr float64) {
	if !valid(rr) {
		return
	}
	if a.n > 0 {
		d := rr - a.last
		a.sqDiff += d * d
		if math.Abs(d) > 50 {
			a.over50++
		}
	}
	a.n++
	delta := rr - a.mean
	a.mean += delta / float64(a.n)
	a.m2 += delta * (rr - a.mean)
	a.last = rr
}

// Reset empties the accumulator.
func (a *Acc) Reset() { *a = Acc{} }

// Stats returns the HRV of the intervals added so far.
func (a *Acc) Stats() Stats {
	s := Stats{N: a.n}
	if a.n == 0 {
		return s
	}
	s.MeanNN = a.mean
	if a.n < 2 {
		return s
	}
	nd := float64(a.n - 1)
	s.SDNN = math.Sqrt(a.m2 / nd)
	s.RMSSD = math.Sqrt(a.sqDiff / nd)
	s.PNN50 = 100 * float64(a.over50) / nd
	return s
}
