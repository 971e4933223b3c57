package model

import "math"

// psiEpsilon replaces an empty bin's proportion in the PSI sum (the usual
// smoothing: an empty bin would otherwise make the index infinite).
const psiEpsilon = 1e-4

// bin returns the reference bin of v: 0 below Edges[0], i for
// Edges[i-1] <= v < Edges[i], len(Edges) at or above the last edge.
func (r *Reference) bin(v float64) int {
	lo, hi := 0, len(r.Edges)
	for lo < hi {
		mid := (lo + hi) / 2
		if v < r.Edges[mid] {
			hi = mid
		} else {
			lo = mid + 1
		}
	}
	return lo
}

// PSI is the population stability index of observed bin counts against
// the reference proportions: sum over bins of (a-e)*ln(a/e), with empty
// proportions replaced by psiEpsilon. By the usual reading, < 0.1 is
// stable, 0.1-0.25 a moderate shift, > 0.25 a major shift. It returns 0
// when there are no counts or no reference.
func (r *Reference) PSI(counts []int) float64 {
	if len(r.Proportions) == 0 || len(counts) != len(r.Proportions) {
		return 0
	}
	total := 0
	for _, c := range counts {
		total += c
	}
	if total == 0 {
		return 0
	}
	psi := 0.0
	for i, c := range counts {
		a := max(float64(c)/float64(total), psiEpsilon)
		e := max(r.Proportions[i], psiEpsilon)
		psi += (a - e) * math.Log(a/e)
	}
	return psi
}

// Quantile returns the q-quantile of the reference distribution, linear
// within interior bins; the open bins below the first and above the last
// edge are read as mass at that edge.
func (r *Reference) Quantile(q float64) float64 {
	if len(r.Edges) == 0 {
		return math.NaN()
	}
	cum := 0.0
	for i, p := range r.Proportions {
		if cum+p >= q && p > 0 {
			switch i {
			case 0:
				return r.Edges[0]
			case len(r.Edges):
				return r.Edges[len(r.Edges)-1]
			}
			lo, hi := r.Edges[i-1], r.Edges[i]
			return lo + (hi-lo)*(q-cum)/p
		}
		cum += p
	}
	return r.Edges[len(r.Edges)-1]
}

// center returns the reference median and spread (interquartile range /
// 1.349, the normal-consistent robust SD), used to rank inputs as top
// contributors. The spread falls back to the edge range divided by the bin
// count, then 1, when the IQR is 0. ok is false without a reference.
func (r *Reference) center() (median, spread float64, ok bool) {
	if len(r.Edges) == 0 {
		return 0, 0, false
	}
	median = r.Quantile(0.5)
	spread = (r.Quantile(0.75) - r.Quantile(0.25)) / 1.349
	if spread <= 0 {
		spread = (r.Edges[len(r.Edges)-1] - r.Edges[0]) / float64(len(r.Proportions))
	}
	if spread <= 0 {
		spread = 1
	}
	return median, spread, true
}

// driftWindow is a bounded sliding window of the bins of one feature's
// most recent observed (not filled) inputs: a ring of bin indexes and the
// counts per bin. Not concurrency-safe (the Model's mutex guards it).
type driftWindow struct {
	ring   []uint16
	next   int
	full   bool
	counts []int
}

func newDriftWindow(size, bins int) *driftWindow {
	return &driftWindow{ring: make([]uint16, size), counts: make([]int, bins)}
}

func (w *driftWindow) add(bin int) {
	if w.full {
		w.counts[w.ring[w.next]]--
	}
	w.ring[w.next] = uint16(bin)
	w.counts[bin]++
	w.next++
	if w.next == len(w.ring) {
		w.next, w.full = 0, true
	}
}
