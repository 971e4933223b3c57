// Package baseline keeps a patient's rolling robust baseline of one metric
// and detects deviations from it and slow drifts away from the patient's
// reference level.
//
// A Series is fed the metric's closed window values in event-time order (in
// the stream engine: each 1-minute window's mean). It keeps:
//
//   - a rolling baseline: the median and MAD of the values of the last Span,
//     summarised into Span/Step buckets (a ring of float32 bucket medians
//     with their value counts), so that memory is bounded (about 5 bytes per
//     bucket: 720 bytes for 24 h of 10-minute buckets). The baseline is the
//     count-weighted median of the bucket medians and the weighted median of
//     their absolute deviations from it (MAD). It is recomputed when a
//     bucket closes, not per value. The weighted median of bucket medians
//     always lies between the 25th and 75th percentile of the raw values
//     (at least half the weight has a bucket median at or below it, and half
//     of each such bucket's values are at or below its median); on data
//     whose level changes slowly it is close to the exact median. The MAD is
//     that of the bucket medians: it measures how the patient's level moves
//     over the span (circadian and activity changes) and leaves out the
//     noise inside one step, which is why each metric has a MAD floor.
//   - a deviation: the robust z = (x - median) / (1.4826 * max(MAD, floor))
//     of x, the median of the newest Smooth values (on the scale of the
//     bucket medians, so that one noisy window does not flip the band), banded (|z| >= MediumZ medium, >= HighZ high, else low)
//     with hysteresis (a band is left only when |z| falls Hysteresis below
//     its threshold); no band (BandWarmingUp) until the closed buckets cover
//     WarmUp.
//   - a slow-drift detector for chronic care: the value's daily (UTC day)
//     means, a reference mean and SD (the first ReferenceDays daily means,
//     or a configured Reference), the EWMA of the daily means, and a
//     two-sided tabular CUSUM of the standardised daily means
//     (u = (mean - ref) / sd; up = max(0, up + u - k), down = max(0, down -
//     u - k)); when one side reaches h the series drifts in that direction
//     since the day that side last left 0, until it falls back to 0. Both
//     sums are capped at 2h so that a drift that ended clears in bounded
//     time.
//
// A Series is not safe for concurrent use; Params are read only.
package baseline

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// MaxBuckets bounds Span/Step.
const MaxBuckets = 1024

// MaxSmooth bounds Params.Smooth.
const MaxSmooth = 8

// maxOpen bounds the values kept for the open bucket (and a bucket's
// count, kept in a byte).
const maxOpen = 255

// DayMs is the length of a drift day (UTC days of event time).
const DayMs = 86_400_000

// madScale makes the MAD a consistent estimator of the standard deviation
// of normal data.
const madScale = 1.4826

// Params are the settings of one metric's baselines.
type Params struct {
	// Span is how far back the rolling baseline reaches; Step the bucket
	// size (Span a whole multiple of Step, at most MaxBuckets buckets).
	Span, Step time.Duration
	// WarmUp is the time the baseline's non-empty buckets must cover
	// before deviations are scored.
	WarmUp time.Duration
	// MADFloor is the smallest MAD used in z (the metric's unit).
	MADFloor float64
	// Smooth is how many of the newest values (1 to MaxSmooth) the scored
	// value is the median of: the baseline is of step medians, and a
	// single noisy window should not flip the band.
	Smooth int
	// MediumZ and HighZ are the |z| of the medium and high bands;
	// Hysteresis how far below a threshold |z| must fall to leave its
	// band.
	MediumZ, HighZ, Hysteresis float64
	// EWMALambda is the weight of a new daily mean in the EWMA.
	EWMALambda float64
	// CUSUMK and CUSUMH are the CUSUM's allowance and decision interval in
	// reference-SD units.
	CUSUMK, CUSUMH float64
	// ReferenceDays is the number of daily means that establish the drift
	// reference (unless Reference is set).
	ReferenceDays int
	// SDFloor is the smallest reference SD (the metric's unit).
	SDFloor float64
	// Reference, when its SD is above 0, is the drift reference instead of
	// the patient's first ReferenceDays.
	Reference Reference
}

// Reference is a drift reference level.
type Reference struct {
	Mean, SD float64
}

// Validate reports the first invalid setting.
func (p *Params) Validate() error {
	switch {
	case p.Step <= 0 || p.Span < p.Step || p.Span%p.Step != 0:
		return fmt.Errorf("span %s must be a positive whole multiple of step %s", p.Span, p.Step)
	case p.Span/p.Step > MaxBuckets:
		return fmt.Errorf("span/step is %d buckets, at most %d", p.Span/p.Step, MaxBuckets)
	case p.WarmUp < 0 || p.WarmUp > p.Span:
		return fmt.Errorf("warm-up %s must be between 0 and the span %s", p.WarmUp, p.Span)
	case p.Smooth < 1 || p.Smooth > MaxSmooth:
		return fmt.Errorf("smoothing %d must be between 1 and %d values", p.Smooth, MaxSmooth)
	case !(p.MADFloor > 0) || !(p.SDFloor > 0):
		return fmt.Errorf("the MAD floor (%g) and SD floor (%g) must be above 0", p.MADFloor, p.SDFloor)
	case !(p.MediumZ > 0) || !(p.HighZ > p.MediumZ) || !(p.Hysteresis >= 0) || p.Hysteresis >= p.MediumZ:
		return fmt.Errorf("need 0 < medium z (%g) < high z (%g) and 0 <= hysteresis (%g) < medium z", p.MediumZ, p.HighZ, p.Hysteresis)
	case !(p.EWMALambda > 0 && p.EWMALambda <= 1):
		return fmt.Errorf("EWMA lambda %g must be in (0, 1]", p.EWMALambda)
	case !(p.CUSUMK >= 0) || !(p.CUSUMH > 0):
		return fmt.Errorf("CUSUM k (%g) must be >= 0 and h (%g) above 0", p.CUSUMK, p.CUSUMH)
	case p.ReferenceDays < 2 && !(p.Reference.SD > 0):
		return fmt.Errorf("reference days %d must be at least 2 (or a reference configured)", p.ReferenceDays)
	case p.Reference.SD < 0 || math.IsNaN(p.Reference.Mean) || math.IsInf(p.Reference.Mean, 0):
		return fmt.Errorf("reference %+v is invalid", p.Reference)
	}
	return nil
}

// Canonical is the text of every setting, for hashing.
func (p *Params) Canonical() string {
	return fmt.Sprintf("smooth=%d span=%d step=%d warm_up=%d mad_floor=%g medium_z=%g high_z=%g hysteresis=%g lambda=%g k=%g h=%g reference_days=%d sd_floor=%g reference=%g/%g",
		p.Smooth, p.Span.Milliseconds(), p.Step.Milliseconds(), p.WarmUp.Milliseconds(), p.MADFloor, p.MediumZ, p.HighZ, p.Hysteresis,
		p.EWMALambda, p.CUSUMK, p.CUSUMH, p.ReferenceDays, p.SDFloor, p.Reference.Mean, p.Reference.SD)
}

func (p *Params) buckets() int { return int(p.Span / p.Step) }

// Band is a deviation band.
type Band int8

// Bands, in increasing severity.
const (
	BandWarmingUp Band = iota
	BandLow
	BandMedium
	BandHigh
)

// String is the band's name in scores.
func (b Band) String() string {
	switch b {
	case BandLow:
		return "low"
	case BandMedium:
		return "medium"
	case BandHigh:
		return "high"
	}
	return "warming_up"
}

// Direction is a drift direction.
type Direction int8

// Directions.
const (
	NoDrift Direction = iota
	Up
	Down
)

// String is the direction's name in scores ("" for none).
func (d Direction) String() string {
	switch d {
	case Up:
		return "up"
	case Down:
		return "down"
	}
	return ""
}

// Drift is a series' drift state.
type Drift struct {
	Direction Direction
	// SinceMs is the start of the day the CUSUM side began to rise;
	// DetectedMs the end of the day whose mean made it cross h.
	SinceMs, DetectedMs int64
}

// Series is one patient's baseline of one metric. The zero value is not
// usable: make it with NewSeries.
type Series struct {
	// med and cnt are the ring of closed buckets: bucket j (event time /
	// Step) in slot j % len; cnt 0 marks an empty slot. Allocated when the
	// first bucket closes.
	med []float32
	cnt []uint8
	// open holds the values of bucket openIdx.
	open    []float32
	openIdx int64
	started bool

	median, mad float64
	covered     int // non-empty closed buckets

	// recent holds the newest values (nrecent of them, the newest at
	// (irecent-1) mod MaxSmooth), which the scored value is the median of.
	recent  [MaxSmooth]float32
	nrecent uint8
	irecent uint8
	last    float64
	lastMs  int64
	z       float64
	band    Band

	day    int64
	daySum float64
	dayN   uint32

	refN                  uint32
	refMean, refM2, refSD float64
	refReady              bool
	ewma, up, down        float64
	upStartMs, downStart  int64
	lastDaily             float64
	days                  uint32
	drift                 Drift

	// Emitted is owned by the caller: the drift direction it last
	// reported (restored with the series).
	Emitted Direction
}

// NewSeries returns an empty series.
func NewSeries() *Series { return &Series{} }

// Add feeds the value x of the window starting at atMs (event time, not
// older than the previous value's: an older one is counted in the current
// bucket and day). It updates the deviation and, when a day closes, the
// drift.
func (s *Series) Add(p *Params, atMs int64, x float64) {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return
	}
	step := p.Step.Milliseconds()
	b := floorDiv(atMs, step)
	if !s.started {
		s.started, s.openIdx = true, b
		s.day = floorDiv(atMs, DayMs)
	}
	if b > s.openIdx {
		s.closeBucket(p, b)
	}
	if len(s.open) < maxOpen {
		s.open = append(s.open, float32(x))
	}
	s.recent[s.irecent] = float32(x)
	s.irecent = (s.irecent + 1) % MaxSmooth
	s.nrecent = min(s.nrecent+1, MaxSmooth)
	s.last, s.lastMs = s.smoothed(p), max(atMs, s.lastMs)
	s.deviate(p, s.last)

	if d := floorDiv(atMs, DayMs); d > s.day {
		if s.dayN > 0 {
			s.closeDay(p)
		}
		s.day = d
	}
	s.daySum += x
	s.dayN++
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && (a < 0) != (b < 0) {
		q--
	}
	return q
}

// closeBucket moves the open bucket into the ring and opens bucket next.
func (s *Series) closeBucket(p *Params, next int64) {
	nb := p.buckets()
	if s.med == nil {
		s.med, s.cnt = make([]float32, nb), make([]uint8, nb)
	}
	m := s.openIdx
	if next-m > int64(nb) {
		clear(s.cnt)
	} else {
		for j := m + 1; j < next; j++ {
			s.cnt[j%int64(nb)] = 0
		}
		slot := m % int64(nb)
		if len(s.open) > 0 {
			s.med[slot], s.cnt[slot] = float32(median32(s.open)), uint8(len(s.open))
		} else {
			s.cnt[slot] = 0
		}
	}
	s.open = s.open[:0]
	s.openIdx = next
	s.recompute()
}

// smoothed is the median of the newest min(Smooth, values) values.
func (s *Series) smoothed(p *Params) float64 {
	n := min(int(s.nrecent), p.Smooth)
	var buf [MaxSmooth]float32
	for i := range n {
		buf[i] = s.recent[(int(s.irecent)-1-i+2*MaxSmooth)%MaxSmooth]
	}
	return median32(buf[:n])
}

// median32 is the median of vs (sorted in place).
func median32(vs []float32) float64 {
	slices.Sort(vs)
	n := len(vs)
	return (float64(vs[(n-1)/2]) + float64(vs[n/2])) / 2
}

// recompute derives median, MAD and coverage from the ring: the buckets
// are sorted once (as packed integer keys: order-preserving bits of the
// float32 median above the count, which sorts without a comparison
// function) and the absolute deviations, which grow outward from the
// median on both sides, are merged from the sorted buckets without a
// second sort.
func (s *Series) recompute() {
	// (On the stack: at most MaxBuckets keys, computed once per bucket.)
	var buf [MaxBuckets]uint64
	keys := buf[:0]
	var total uint64
	for i, c := range s.cnt {
		if c > 0 {
			keys = append(keys, uint64(orderBits(s.med[i]))<<32|uint64(c))
			total += uint64(c)
		}
	}
	s.covered = len(keys)
	if len(keys) == 0 {
		s.median, s.mad = 0, 0
		return
	}
	slices.Sort(keys)
	// Median: the mean of the elements of rank (W-1)/2 and W/2 of the
	// multiset in which each bucket median occurs count times.
	r1, r2 := (total-1)/2, total/2
	var cum uint64
	i1, i2 := -1, -1
	for i, k := range keys {
		cum += k & 0xff
		if i1 < 0 && cum > r1 {
			i1 = i
		}
		if cum > r2 {
			i2 = i
			break
		}
	}
	s.median = (keyValue(keys[i1]) + keyValue(keys[i2])) / 2
	// MAD: merge the deviations outward from the median: left holds the
	// keys below the split (deviations ascending leftward), right those
	// from it.
	split, _ := slices.BinarySearchFunc(keys, s.median, func(k uint64, m float64) int {
		if keyValue(k) < m {
			return -1
		}
		return 1
	})
	l, r := split-1, split
	cum = 0
	var d1 float64
	found1 := false
	for {
		var d float64
		var w uint64
		if r >= len(keys) || l >= 0 && s.median-keyValue(keys[l]) <= keyValue(keys[r])-s.median {
			d, w = s.median-keyValue(keys[l]), keys[l]&0xff
			l--
		} else {
			d, w = keyValue(keys[r])-s.median, keys[r]&0xff
			r++
		}
		cum += w
		if !found1 && cum > r1 {
			d1, found1 = d, true
		}
		if cum > r2 {
			s.mad = (d1 + d) / 2
			return
		}
	}
}

// orderBits maps a float32 to a uint32 with the same order.
func orderBits(f float32) uint32 {
	b := math.Float32bits(f)
	if b&(1<<31) != 0 {
		return ^b
	}
	return b | 1<<31
}

// keyValue is the bucket median of a packed key.
func keyValue(k uint64) float64 {
	b := uint32(k >> 32)
	if b&(1<<31) != 0 {
		b &^= 1 << 31
	} else {
		b = ^b
	}
	return float64(math.Float32frombits(b))
}

// deviate scores x against the baseline.
func (s *Series) deviate(p *Params, x float64) {
	if !s.Ready(p) {
		s.z, s.band = 0, BandWarmingUp
		return
	}
	s.z = (x - s.median) / (madScale * max(s.mad, p.MADFloor))
	a := math.Abs(s.z)
	band := BandLow
	switch {
	case a >= p.HighZ || s.band == BandHigh && a >= p.HighZ-p.Hysteresis:
		band = BandHigh
	case a >= p.MediumZ || s.band >= BandMedium && a >= p.MediumZ-p.Hysteresis:
		band = BandMedium
	}
	s.band = band
}

// closeDay ends the day s.day with its mean.
func (s *Series) closeDay(p *Params) {
	mean := s.daySum / float64(s.dayN)
	s.daySum, s.dayN = 0, 0
	s.lastDaily = mean
	dayStart := s.day * DayMs
	if !s.refReady {
		if p.Reference.SD > 0 {
			s.refMean, s.refSD, s.refReady = p.Reference.Mean, max(p.Reference.SD, p.SDFloor), true
			s.ewma = s.refMean
		} else {
			// Welford over the reference days' means.
			s.refN++
			d := mean - s.refMean
			s.refMean += d / float64(s.refN)
			s.refM2 += d * (mean - s.refMean)
			if int(s.refN) >= p.ReferenceDays {
				s.refSD = max(math.Sqrt(s.refM2/float64(s.refN-1)), p.SDFloor)
				s.refReady, s.ewma = true, s.refMean
			}
			return
		}
	}
	s.days++
	u := (mean - s.refMean) / s.refSD
	s.ewma = p.EWMALambda*mean + (1-p.EWMALambda)*s.ewma
	limit := 2 * p.CUSUMH
	if up := min(max(0, s.up+u-p.CUSUMK), limit); up > 0 && s.up == 0 {
		s.up, s.upStartMs = up, dayStart
	} else {
		s.up = up
	}
	if down := min(max(0, s.down-u-p.CUSUMK), limit); down > 0 && s.down == 0 {
		s.down, s.downStart = down, dayStart
	} else {
		s.down = down
	}
	switch {
	case s.up >= p.CUSUMH && s.drift.Direction != Up:
		s.drift = Drift{Direction: Up, SinceMs: s.upStartMs, DetectedMs: dayStart + DayMs}
	case s.down >= p.CUSUMH && s.drift.Direction != Down:
		s.drift = Drift{Direction: Down, SinceMs: s.downStart, DetectedMs: dayStart + DayMs}
	case s.drift.Direction == Up && s.up == 0, s.drift.Direction == Down && s.down == 0:
		s.drift = Drift{}
	}
}

// Ready reports whether the baseline covers the warm-up.
func (s *Series) Ready(p *Params) bool {
	return s.covered > 0 && time.Duration(s.covered)*p.Step >= p.WarmUp
}

// Baseline returns the rolling median and MAD (unfloored) of the closed
// buckets, and how many buckets hold values.
func (s *Series) Baseline() (median, mad float64, buckets int) { return s.median, s.mad, s.covered }

// Deviation returns the scored value (the median of the newest Smooth
// values), the newest window start, its robust z and band (BandWarmingUp
// and 0 before the warm-up).
func (s *Series) Deviation() (x float64, atMs int64, z float64, band Band) {
	return s.last, s.lastMs, s.z, s.band
}

// Drift returns the drift state.
func (s *Series) Drift() Drift { return s.drift }

// DriftState is the detail of the drift detector.
type DriftState struct {
	// Ready: the reference is established.
	Ready bool
	// ReferenceMean and ReferenceSD are the reference; EWMA the smoothed
	// daily mean; Up and Down the CUSUM sums; LastDailyMean the newest
	// closed day's mean; Days the days evaluated after the reference.
	ReferenceMean, ReferenceSD, EWMA, Up, Down, LastDailyMean float64
	Days                                                      int
}

// DriftDetail returns the drift detector's state.
func (s *Series) DriftDetail() DriftState {
	return DriftState{Ready: s.refReady, ReferenceMean: s.refMean, ReferenceSD: s.refSD, EWMA: s.ewma, Up: s.up, Down: s.down,
		LastDailyMean: s.lastDaily, Days: int(s.days)}
}
