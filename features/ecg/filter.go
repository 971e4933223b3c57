package ecg

import "math"

// biquad is a second-order IIR section in transposed direct form II.
type biquad struct {
	b0, b1, b2, a1, a2 float64
	s1, s2             float64
}

// butterworth2 returns a 2nd-order Butterworth low-pass (high=false) or
// high-pass section at cut Hz for sampling rate fs (bilinear transform with
// pre-warping, after R. Bristow-Johnson's cookbook with Q = 1/sqrt 2).
func butterworth2(fs, cut float64, high bool) biquad {
	w0 := 2 * math.Pi * cut / fs
	cosw, sinw := math.Cos(w0), math.Sin(w0)
	alpha := sinw / (2 * math.Sqrt2 / 2) // sin(w0)/(2Q), Q = 1/sqrt(2)
	a0 := 1 + alpha
	var q biquad
	if high {
		q.b0 = (1 + cosw) / 2 / a0
		q.b1 = -(1 + cosw) / a0
	} else {
		q.b0 = (1 - cosw) / 2 / a0
		q.b1 = (1 - cosw) / a0
	}
	q.b2 = q.b0
	q.a1 = -2 * cosw / a0
	q.a2 = (1 - alpha) / a0
	return q
}

func (q *biquad) step(x float64) float64 {
	y := q.b0*x + q.s1
	q.s1 = q.b1*x - q.a1*y + q.s2
	q.s2 = q.b2*x - q.a2*y
	return y
}

// dcGain is the section's gain at 0 Hz.
func (q *biquad) dcGain() float64 { return (q.b0 + q.b1 + q.b2) / (1 + q.a1 + q.a2) }

// settle sets the state to the steady state for a constant input x, so a
// signal that starts at an offset does not ring the filter.
func (q *biquad) settle(x float64) float64 {
	y := q.dcGain() * x
	q.s2 = q.b2*x - q.a2*y
	q.s1 = y - q.b0*x
	return y
}
