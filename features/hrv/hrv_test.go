package hrv

import (
	"math"
	"testing"
)

func near(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Max(1, math.Abs(b)) }

func check(t *testing.T, name string, got, want Stats) {
	t.Helper()
	if got.N != want.N || !near(got.MeanNN, want.MeanNN) || !near(got.SDNN, want.SDNN) ||
		!near(got.RMSSD, want.RMSSD) || !near(got.PNN50, want.PNN50) {
		t.Errorf("%s: got %+v, want %+v", name, got, want)
	}
}

// TestHandComputed checks values worked out by hand.
//
// rr = 800, 810, 790, 870, 800 ms:
//
//	mean = 4070/5 = 814
//	deviations -14, -4, -24, 56, -14; squares 196+16+576+3136+196 = 4120
//	SDNN = sqrt(4120/4) = sqrt(1030) = 32.09361307...
//	successive differences 10, -20, 80, -70; squares 100+400+6400+4900 = 11800
//	RMSSD = sqrt(11800/4) = sqrt(2950) = 54.31390246...
//	|diff| > 50: 80 and 70 -> 2 of 4 = 50 %
//
// rr = 800, 850, 800 (differences of exactly 50 ms do not count):
//
//	mean = 2450/3 = 816.67; deviations -16.67, 33.33, -16.67;
//	squares sum = 1666.67; SDNN = sqrt(833.33) = 28.8675...
//	RMSSD = sqrt((2500+2500)/2) = 50; pNN50 = 0
func TestHandComputed(t *testing.T) {
	cases := []struct {
		name string
		rr   []float64
		want Stats
	}{
		{"five", []float64{800, 810, 790, 870, 800},
			Stats{N: 5, MeanNN: 814, SDNN: math.Sqrt(1030), RMSSD: math.Sqrt(2950), PNN50: 50}},
		{"exactly50", []float64{800, 850, 800},
			Stats{N: 3, MeanNN: 2450.0 / 3, SDNN: math.Sqrt((5000.0 / 3) / 2), RMSSD: 50, PNN50: 0}},
		{"constant", []float64{1000, 1000}, Stats{N: 2, MeanNN: 1000}},
		{"single", []float64{640}, Stats{N: 1, MeanNN: 640}},
		{"empty", nil, Stats{}},
		// Invalid values are skipped and the difference is taken across them.
		{"skips", []float64{800, math.NaN(), 810, 0, 790, -5, 870, math.Inf(1), 800},
			Stats{N: 5, MeanNN: 814, SDNN: math.Sqrt(1030), RMSSD: math.Sqrt(2950), PNN50: 50}},
	}
	for _, c := range cases {
		check(t, c.name+"/Compute", Compute(c.rr), c.want)
		var a Acc
		for _, rr := range c.rr {
			a.Add(rr)
		}
		check(t, c.name+"/Acc", a.Stats(), c.want)
	}
}

func TestAccReset(t *testing.T) {
	var a Acc
	a.Add(700)
	a.Add(900)
	a.Reset()
	a.Add(800)
	if s := a.Stats(); s.N != 1 || s.MeanNN != 800 || s.RMSSD != 0 {
		t.Fatalf("after Reset: %+v", s)
	}
}

func TestNoAllocation(t *testing.T) {
	rr := []float64{800, 810, 790, 870, 800, 820, 760}
	var sink Stats
	if n := testing.AllocsPerRun(100, func() { sink = Compute(rr) }); n != 0 {
		t.Fatalf("Compute allocates %v times", n)
	}
	var a Acc
	if n := testing.AllocsPerRun(100, func() { a.Add(812); sink = a.Stats() }); n != 0 {
		t.Fatalf("Acc allocates %v times", n)
	}
	_ = sink
}
