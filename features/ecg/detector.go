// Package ecg detects R peaks in a streaming ECG with the Pan–Tompkins
// method (IEEE Trans Biomed Eng 1985;32:230-6), adapted to any sampling rate:
//
//  1. band-pass 5–15 Hz (2nd-order Butterworth high-pass and low-pass
//     sections, designed for the stream's rate by the bilinear transform);
//  2. five-point derivative;
//  3. squaring;
//  4. moving-window integration over 150 ms;
//  5. peaks of the integrated signal classified against adaptive signal and
//     noise levels (SPKI/NPKI, threshold NPKI + 0.25 (SPKI − NPKI)), with a
//     200 ms refractory period, T-wave discrimination (a peak within 360 ms
//     of the last beat whose steepest slope is under half that beat's is a T
//     wave), and search-back: when no beat came for 1.66 times the mean of
//     the last 8 RR intervals, the largest peak since the last beat above
//     half the threshold is taken as a beat.
//
// The thresholds learn from the first 2 s of signal (SPKI = max/3,
// NPKI = mean/2 of the integrated signal), after which the peaks of the
// learning period are classified too, so the first beats are not lost.
//
// Each detected integrated-signal peak is located on the raw signal: the
// sample in the 250 ms before it that deviates most from that window's mean
// (the R peak on a lead with an upright QRS, the deepest deflection on
// others).
//
// Everything runs sample by sample on state that the Detector carries across
// calls, so the peaks found are the same whatever the chunking of the input
// (a test checks it). Peaks come out with a delay of at most about 0.45 s;
// Flush ends the stream. Memory is fixed by the rate (a few rings of about
// 0.5 s of samples). The Pan–Tompkins stages are hand-written: no Go library
// offers a streaming detector.
package ecg

import (
	"fmt"
	"math"
)

// MinRateHz and MaxRateHz bound the sampling rates the detector accepts; it
// is designed and tested for 125–1000 Hz.
const (
	MinRateHz = 100
	MaxRateHz = 2000
)

// Peak is one detected R peak.
type Peak struct {
	// Index is the peak's sample number, counted from the first sample
	// the Detector saw after New or Reset.
	Index int64
	// Amplitude is the raw signal at Index (input units).
	Amplitude float64
}

// candidate is a finished peak of the integrated signal.
type candidate struct {
	mwiIdx int64   // where the integrated signal peaked
	val    float64 // the integrated signal there
	slope  float64 // steepest |derivative| in the integration window
	refIdx int64   // located R peak on the raw signal
	refAmp float64
	finIdx int64 // sample at which the candidate was finished
}

const (
	learnCap   = 64 // candidates kept during the learning period
	backlogCap = 32 // noise candidates kept for search-back
	rrHistory  = 8
)

// Detector is a streaming R-peak detector for one channel. Not safe for
// concurrent use; the caller owns the slices it passes and gets.
type Detector struct {
	fs float64
	// Lengths in samples.
	mwiN, win, timeout, refractory, twave, learnN int64
	ring                                          int64

	hp, lp biquad
	i      int64 // samples seen
	last   float64
	raw    []float64 // rings of length ring
	bp     []float64
	der    []float64
	sq     []float64 // ring of length mwiN
	sqSum  float64

	// Integrated-signal peak picking.
	rising   bool
	prevMWI  float64
	candVal  float64
	candIdx  int64
	learning bool
	learnMax float64
	learnSum float64
	learned  []candidate

	spki, npki float64
	backlog    []candidate
	hasBeat    bool
	lastMWI    int64
	lastRef    int64
	lastSlope  float64
	refFrom    int64 // search-back reference before the first beat
	rr         [rrHistory]int64
	nrr        int
}

// New returns a detector for a stream sampled at rateHz.
func New(rateHz float64) (*Detector, error) {
	if !(rateHz >= MinRateHz && rateHz <= MaxRateHz) {
		return nil, fmt.Errorf("sampling rate %v Hz: want %d..%d", rateHz, MinRateHz, MaxRateHz)
	}
	d := &Detector{fs: rateHz}
	sec := func(s float64) int64 { return int64(math.Round(s * rateHz)) }
	d.mwiN = sec(0.150)
	d.win = sec(0.250)
	d.timeout = sec(0.200)
	d.refractory = sec(0.200)
	d.twave = sec(0.360)
	d.learnN = sec(2)
	d.ring = d.win + d.timeout + 8
	d.raw = make([]float64, d.ring)
	d.bp = make([]float64, d.ring)
	d.der = make([]float64, d.ring)
	d.sq = make([]float64, d.mwiN)
	d.learned = make([]candidate, 0, learnCap)
	d.backlog = make([]candidate, 0, backlogCap)
	d.Reset()
	return d, nil
}

// RateHz returns the sampling rate the detector was made for.
func (d *Detector) RateHz() float64 { return d.fs }

// Samples returns how many samples the detector has seen since New or
// Reset.
func (d *Detector) Samples() int64 { return d.i }

// Reset forgets the stream: the next sample is sample 0 and the thresholds
// learn again (after a gap or a discontinuity).
func (d *Detector) Reset() {
	d.hp = butterworth2(d.fs, 5, true)
	d.lp = butterworth2(d.fs, 15, false)
	d.i = 0
	d.last = 0
	clear(d.raw)
	clear(d.bp)
	clear(d.der)
	clear(d.sq)
	d.sqSum = 0
	d.rising, d.prevMWI, d.candVal, d.candIdx = false, 0, 0, 0
	d.learning, d.learnMax, d.learnSum = true, 0, 0
	d.learned = d.learned[:0]
	d.spki, d.npki = 0, 0
	d.backlog = d.backlog[:0]
	d.hasBeat, d.lastMWI, d.lastRef, d.lastSlope, d.refFrom = false, 0, -1, 0, 0
	d.rr = [rrHistory]int64{}
	d.nrr = 0
}

// Process feeds the next samples (NaN or infinite values repeat the last
// good one) and appends the peaks it confirmed to dst, in increasing Index
// order. It does not keep x.
func (d *Detector) Process(dst []Peak, x []float64) []Peak {
	for _, v := range x {
		dst = d.step(dst, v)
	}
	return dst
}

// Flush confirms what is pending at the end of the stream (the peak being
// integrated, the learning period of a short stream) and appends the peaks
// to dst. Feeding more samples afterwards continues the stream.
func (d *Detector) Flush(dst []Peak) []Peak {
	if d.rising {
		dst = d.finish(dst, d.candIdx, d.candVal)
		d.rising = false
	}
	if d.learning && d.learnMax > 0 {
		dst = d.endLearning(dst)
	}
	return dst
}

func (d *Detector) step(dst []Peak, v float64) []Peak {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		v = d.last
	}
	var b float64
	if d.i == 0 {
		b = d.lp.settle(d.hp.settle(v))
		for k := range d.raw {
			d.raw[k] = v
			d.bp[k] = b
		}
	} else {
		b = d.lp.step(d.hp.step(v))
	}
	d.last = v
	i := d.i
	r := i % d.ring
	d.raw[r] = v
	d.bp[r] = b
	at := func(k int64) float64 { return d.bp[((i-k)%d.ring+d.ring)%d.ring] }
	der := (2*b + at(1) - at(3) - 2*at(4)) * d.fs / 8
	d.der[r] = der
	sq := der * der
	m := i % d.mwiN
	d.sqSum += sq - d.sq[m]
	d.sq[m] = sq
	if d.sqSum < 0 {
		d.sqSum = 0
	}
	mwi := d.sqSum / float64(d.mwiN)
	d.i++

	if d.learning {
		d.learnMax = math.Max(d.learnMax, mwi)
		d.learnSum += mwi
	}
	// Peak picking: a peak starts when the integrated signal rises and
	// ends when it falls under half its maximum or after the timeout.
	if d.rising {
		if mwi > d.candVal {
			d.candVal, d.candIdx = mwi, i
		} else if mwi < d.candVal/2 || i-d.candIdx >= d.timeout {
			d.rising = false
			dst = d.finish(dst, d.candIdx, d.candVal)
		}
	} else if mwi > d.prevMWI && i > 0 {
		d.rising, d.candVal, d.candIdx = true, mwi, i
	}
	d.prevMWI = mwi

	if d.learning && d.i >= d.learnN && d.learnMax > 0 {
		dst = d.endLearning(dst)
	}
	if !d.learning {
		dst = d.searchBack(dst, i)
	}
	return dst
}

// finish turns the integrated-signal peak at p into a candidate, located on
// the raw signal while the rings still hold its window.
func (d *Detector) finish(dst []Peak, p int64, val float64) []Peak {
	from := max(p-d.win, d.i-d.ring+1, 0)
	var mean float64
	for k := from; k <= p; k++ {
		mean += d.raw[k%d.ring]
	}
	mean /= float64(p - from + 1)
	c := candidate{mwiIdx: p, val: val, refIdx: p, finIdx: d.i - 1}
	best := -1.0
	for k := from; k <= p; k++ {
		if dev := math.Abs(d.raw[k%d.ring] - mean); dev > best {
			best, c.refIdx, c.refAmp = dev, k, d.raw[k%d.ring]
		}
	}
	for k := max(p-d.mwiN, from); k <= p; k++ {
		c.slope = math.Max(c.slope, math.Abs(d.der[k%d.ring]))
	}
	if d.learning {
		if len(d.learned) < learnCap {
			d.learned = append(d.learned, c)
		}
		return dst
	}
	return d.classify(dst, c)
}

func (d *Detector) endLearning(dst []Peak) []Peak {
	d.learning = false
	d.spki = d.learnMax / 3
	d.npki = d.learnSum / float64(max(d.i, 1)) / 2
	d.refFrom = 0
	for _, c := range d.learned {
		dst = d.searchBack(dst, c.finIdx)
		dst = d.classify(dst, c)
	}
	d.learned = d.learned[:0]
	return dst
}

func (d *Detector) thresholds() (thr1, thr2 float64) {
	thr1 = d.npki + 0.25*(d.spki-d.npki)
	return thr1, thr1 / 2
}

func (d *Detector) classify(dst []Peak, c candidate) []Peak {
	if d.hasBeat && c.mwiIdx-d.lastMWI < d.refractory {
		return dst // inside the refractory period: ignored
	}
	thr1, _ := d.thresholds()
	if c.val > thr1 {
		if d.hasBeat && c.mwiIdx-d.lastMWI < d.twave && c.slope < d.lastSlope/2 {
			return d.noise(dst, c) // T wave
		}
		return d.accept(dst, c, 0.125)
	}
	return d.noise(dst, c)
}

func (d *Detector) noise(dst []Peak, c candidate) []Peak {
	d.npki = 0.125*c.val + 0.875*d.npki
	if len(d.backlog) == cap(d.backlog) {
		// Keep the largest: drop the smallest to make room.
		small := 0
		for k := range d.backlog {
			if d.backlog[k].val < d.backlog[small].val {
				small = k
			}
		}
		if d.backlog[small].val >= c.val {
			return dst
		}
		d.backlog = append(d.backlog[:small], d.backlog[small+1:]...)
	}
	d.backlog = append(d.backlog, c)
	return dst
}

func (d *Detector) accept(dst []Peak, c candidate, w float64) []Peak {
	if c.refIdx <= d.lastRef {
		return dst // located on or before the previous beat: not a new one
	}
	d.spki = w*c.val + (1-w)*d.spki
	if d.hasBeat {
		d.rr[d.nrr%rrHistory] = c.refIdx - d.lastRef
		d.nrr++
	}
	d.hasBeat, d.lastMWI, d.lastRef, d.lastSlope = true, c.mwiIdx, c.refIdx, c.slope
	// Keep only later peaks (beyond the refractory period) for search-back.
	k := 0
	for _, b := range d.backlog {
		if b.mwiIdx-c.mwiIdx >= d.refractory {
			d.backlog[k] = b
			k++
		}
	}
	d.backlog = d.backlog[:k]
	return append(dst, Peak{Index: c.refIdx, Amplitude: c.refAmp})
}

// rrMean is the mean of the last (up to 8) RR intervals, 1 s before any.
func (d *Detector) rrMean() float64 {
	n := min(d.nrr, rrHistory)
	if n == 0 {
		return d.fs
	}
	var s int64
	for _, v := range d.rr[:n] {
		s += v
	}
	return float64(s) / float64(n)
}

// searchBack takes the largest backlog peak above the lower threshold as a
// beat when none came for 1.66 mean RR intervals before sample i.
func (d *Detector) searchBack(dst []Peak, i int64) []Peak {
	ref := d.refFrom
	if d.hasBeat {
		ref = d.lastMWI
	}
	if len(d.backlog) == 0 || float64(i-ref) <= 1.66*d.rrMean() {
		return dst
	}
	_, thr2 := d.thresholds()
	best := -1
	for k, b := range d.backlog {
		if b.val > thr2 && (best < 0 || b.val > d.backlog[best].val) {
			best = k
		}
	}
	if best < 0 {
		return dst
	}
	c := d.backlog[best]
	d.backlog = append(d.backlog[:best], d.backlog[best+1:]...)
	return d.accept(dst, c, 0.25)
}

// RRIntervalsMs appends to dst the intervals (ms) between consecutive peaks
// of one uninterrupted stream sampled at rateHz.
func RRIntervalsMs(dst []float64, peaks []Peak, rateHz float64) []float64 {
	for k := 1; k < len(peaks); k++ {
		dst = append(dst, float64(peaks[k].Index-peaks[k-1].Index)*1000/rateHz)
	}
	return dst
}

// CopyFrom makes d an exact copy of src (rate, thresholds, rings, pending
// peaks), re-using d's buffers when they fit. The waveform processor keeps a
// copy to undo a chunk whose RR intervals could not be delivered, so that
// the sender's retry continues the stream exactly.
func (d *Detector) CopyFrom(src *Detector) {
	raw, bp, der, sq, learned, backlog := d.raw, d.bp, d.der, d.sq, d.learned, d.backlog
	*d = *src
	d.raw = append(raw[:0], src.raw...)
	d.bp = append(bp[:0], src.bp...)
	d.der = append(der[:0], src.der...)
	d.sq = append(sq[:0], src.sq...)
	if cap(learned) < learnCap {
		learned = make([]candidate, 0, learnCap)
	}
	if cap(backlog) < backlogCap {
		backlog = make([]candidate, 0, backlogCap)
	}
	d.learned = append(learned[:0], src.learned...)
	d.backlog = append(backlog[:0], src.backlog...)
}
