package baseline

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
)

const minuteMs = 60_000

// params are the defaults of detectors.baselines with floor as MAD floor.
func params(floor float64) Params {
	return Params{Smooth: 1, Span: 24 * time.Hour, Step: 10 * time.Minute, WarmUp: 12 * time.Hour, MADFloor: floor,
		MediumZ: 2, HighZ: 3, Hysteresis: 0.5, EWMALambda: 0.2, CUSUMK: 1.25, CUSUMH: 6, ReferenceDays: 14, SDFloor: floor / 2}
}

// exactMedian is the textbook median of vs.
func exactMedian(vs []float64) float64 {
	s := slices.Clone(vs)
	slices.Sort(s)
	n := len(s)
	return (s[(n-1)/2] + s[n/2]) / 2
}

func exactMAD(vs []float64) (float64, float64) {
	m := exactMedian(vs)
	d := make([]float64, len(vs))
	for i, v := range vs {
		d[i] = math.Abs(v - m)
	}
	return m, exactMedian(d)
}

// With one value per bucket the bucketed baseline is exact: compare it with
// a brute-force median and MAD of the values of the last span, over random
// data with random gaps (which exercise the ring's clearing).
func TestMedianMADEqualsBruteForce(t *testing.T) {
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 1))
		p := params(0.1)
		p.Span, p.Step = 5*time.Hour, time.Minute // 300 buckets
		s := NewSeries()
		type tv struct {
			b int64
			v float64
		}
		var hist []tv
		b := int64(rng.IntN(1000))
		for range 2000 {
			// Mostly consecutive minutes, sometimes gaps (a few longer
			// than the span).
			switch r := rng.IntN(100); {
			case r < 3:
				b += int64(rng.IntN(400))
			case r < 10:
				b += 1 + int64(rng.IntN(5))
			default:
				b++
			}
			// Heavy-tailed, float32-representable values.
			v := float64(float32(80 + 10*rng.NormFloat64()*math.Exp(rng.NormFloat64())))
			s.Add(&p, b*minuteMs, v)
			hist = append(hist, tv{b, v})
			// The baseline covers the closed buckets [b-300, b-1].
			var win []float64
			for _, h := range hist {
				if h.b >= b-300 && h.b < b {
					win = append(win, h.v)
				}
			}
			med, mad, n := s.Baseline()
			if len(win) == 0 {
				if n != 0 {
					t.Fatalf("seed %d: %d buckets, want none", seed, n)
				}
				continue
			}
			wm, wmad := exactMAD(win)
			if n != len(win) || math.Abs(med-wm) > 1e-9 || math.Abs(mad-wmad) > 1e-9 {
				t.Fatalf("seed %d at bucket %d: median %v MAD %v over %d buckets, brute force %v %v over %d", seed, b, med, mad, n, wm, wmad, len(win))
			}
		}
	}
}

// rank returns the fraction of vs below x and at or below x.
func rank(vs []float64, x float64) (below, atOrBelow float64) {
	var lo, le int
	for _, v := range vs {
		if v < x {
			lo++
		}
		if v <= x {
			le++
		}
	}
	return float64(lo) / float64(len(vs)), float64(le) / float64(len(vs))
}

// With 10 values per 10-minute bucket (uneven counts from random gaps) the
// median of the bucket medians lies between the 25th and 75th percentiles
// of the raw values, whatever the data; on noisy data with a slowly moving
// level (circadian) its rank is within 3% of the exact median's and the MAD
// within 15% of the exact MAD.
func TestBucketedApproximationErrorBound(t *testing.T) {
	worstMed, worstMAD := 0.0, 0.0
	for seed := range uint64(30) {
		rng := rand.New(rand.NewPCG(seed, 2))
		p := params(0.1)
		s := NewSeries()
		var hist []float64
		var times []int64
		heavy := seed%3 == 0
		for m := int64(0); m < 3*24*60; m++ {
			if rng.IntN(10) == 0 {
				continue // a missing minute: uneven bucket counts
			}
			level := 80 + 12*math.Sin(2*math.Pi*float64(m)/(24*60)) // circadian
			noise := 2 * rng.NormFloat64()
			if heavy {
				noise *= math.Exp(1.5 * rng.NormFloat64())
			}
			v := float64(float32(level + noise))
			s.Add(&p, m*minuteMs, v)
			hist, times = append(hist, v), append(times, m)
			if m%10 != 0 || m < 24*60 {
				continue
			}
			// Closed buckets: minutes [m-1440, m).
			var win []float64
			for i, tm := range times {
				if tm >= m-1440 && tm < m {
					win = append(win, hist[i])
				}
			}
			med, mad, _ := s.Baseline()
			if below, le := rank(win, med); le < 0.25 || below > 0.75 {
				t.Fatalf("seed %d minute %d: median %v has rank %.3f-%.3f, outside the 25-75%% bound", seed, m, med, below, le)
			}
			if heavy {
				continue
			}
			_, wmad := exactMAD(win)
			below, le := rank(win, med)
			worstMed = max(worstMed, math.Abs((below+le)/2-0.5))
			worstMAD = max(worstMAD, math.Abs(mad-wmad)/wmad)
		}
	}
	t.Logf("normal noise, circadian level: worst median rank error %.3f, worst relative MAD error %.3f", worstMed, worstMAD)
	if worstMed > 0.03 || worstMAD > 0.15 {
		t.Fatalf("worst median rank error %.3f (want <= 0.03), worst relative MAD error %.3f (want <= 0.15)", worstMed, worstMAD)
	}
}

// A step change after a day of stable values is banded high at once; the
// warm-up holds the band back until 12 hours of buckets exist.
func TestDeviationOnStepChange(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	p := params(3)
	s := NewSeries()
	highs := 0
	for m := int64(0); m < 24*60; m++ {
		s.Add(&p, m*minuteMs, 70+4*rng.NormFloat64())
		_, _, z, band := s.Deviation()
		if m < 12*60 && (band != BandWarmingUp || z != 0) {
			t.Fatalf("minute %d: band %v z %v during the warm-up", m, band, z)
		}
		if m > 12*60+10 && band == BandWarmingUp {
			t.Fatalf("minute %d: still warming up", m)
		}
		if band == BandHigh {
			highs++
		}
	}
	if highs > 10 {
		t.Fatalf("%d high bands over 12 stable hours", highs)
	}
	s.Add(&p, 24*60*minuteMs, 100) // (closes a bucket: the baseline moves)
	med, mad, _ := s.Baseline()
	x, _, z, band := s.Deviation()
	want := (100 - med) / (1.4826 * max(mad, 3))
	if band != BandHigh || math.Abs(z-want) > 1e-9 || z < 3 {
		t.Fatalf("after the step to %v: z %v (want %v) band %v, baseline %v/%v", x, z, want, band, med, mad)
	}
	// Hysteresis: 2.8 keeps high, 2.4 drops to medium, 1.6 stays medium,
	// 1.4 is low.
	for _, c := range []struct {
		z    float64
		want Band
	}{{2.8, BandHigh}, {2.4, BandMedium}, {1.6, BandMedium}, {1.4, BandLow}, {-3.1, BandHigh}} {
		s.Add(&p, 24*60*minuteMs, med+c.z*1.4826*max(mad, 3))
		if _, _, _, band := s.Deviation(); band != c.want {
			t.Fatalf("z %v: band %v, want %v", c.z, band, c.want)
		}
	}
}

// dailyReadings simulates days of readings per day around level(day) with
// the given noise and feeds them; it returns the first day (0-based) at whose
// end a drift was detected, or -1, and the drift.
func dailyReadings(p *Params, rng *rand.Rand, days, perDay int, noise float64, level func(day int) float64) (int, Drift) {
	s := NewSeries()
	for d := range days {
		for i := range perDay {
			at := int64(d)*DayMs + int64(7*60+i*(14*60)/perDay)*minuteMs
			s.Add(p, at, level(d)+noise*rng.NormFloat64())
		}
		// The day closes with the next day's first value; probe with
		// the drift as known after day d closed.
		if dr := s.Drift(); dr.Direction != NoDrift {
			return d - 1, dr
		}
	}
	return -1, Drift{}
}

// CUSUM on home blood pressure (two readings a day, SD 8 mmHg): a creep of
// +1 mmHg/day starting after the 14 reference days and a week more is
// detected upward within 25 days, dated at most a week before the creep
// began; the same noise without creep raises no drift in 90 days in at
// least 95% of 200 seeds.
func TestCUSUMSystolicCreep(t *testing.T) {
	p := params(5)
	const start = 21
	var delays []int
	for seed := range uint64(200) {
		rng := rand.New(rand.NewPCG(seed, 3))
		day, dr := dailyReadings(&p, rng, 90, 2, 8, func(d int) float64 { return 130 + float64(max(0, d-start)) })
		if day < 0 || dr.Direction != Up || day > start+25 || dr.SinceMs < int64(start-7)*DayMs {
			t.Fatalf("seed %d: drift %+v at day %d (creep from day %d)", seed, dr, day, start)
		}
		if dr.DetectedMs != int64(day+1)*DayMs {
			t.Fatalf("seed %d: detected %d, want end of day %d", seed, dr.DetectedMs, day)
		}
		delays = append(delays, day-start)
	}
	slices.Sort(delays)
	alarms := 0
	for seed := range uint64(200) {
		rng := rand.New(rand.NewPCG(seed, 4))
		if day, _ := dailyReadings(&p, rng, 90, 2, 8, func(int) float64 { return 130 }); day >= 0 {
			alarms++
		}
	}
	t.Logf("creep detected after median %d days (max %d); false alarms %d/200 over 90 stationary days", delays[len(delays)/2], delays[len(delays)-1], alarms)
	if alarms > 10 {
		t.Fatalf("%d of 200 stationary series raised a drift", alarms)
	}
}

// SpO2 drifting down 0.2 %/day and resting heart rate rising 0.5/min per
// day (hourly 1-minute means) are found in the right direction.
func TestCUSUMSpO2DownAndHeartRateUp(t *testing.T) {
	for _, c := range []struct {
		name        string
		floor, base float64
		noise       float64
		slope       float64
		want        Direction
	}{
		{"spo2", 1, 96, 1, -0.2, Down},
		{"heart_rate", 3, 62, 4, 0.5, Up},
	} {
		p := params(c.floor)
		for seed := range uint64(50) {
			rng := rand.New(rand.NewPCG(seed, 5))
			day, dr := dailyReadings(&p, rng, 80, 24, c.noise, func(d int) float64 { return c.base + c.slope*float64(max(0, d-20)) })
			if dr.Direction != c.want || day < 20 || day > 50 {
				t.Fatalf("%s seed %d: drift %+v at day %d, want %v after day 20", c.name, seed, dr, day, c.want)
			}
			rng = rand.New(rand.NewPCG(seed, 6))
			if day, dr := dailyReadings(&p, rng, 80, 24, c.noise, func(int) float64 { return c.base }); day >= 0 && seed < 3 {
				t.Logf("%s seed %d: stationary drift %+v at day %d", c.name, seed, dr, day)
			}
		}
	}
}

// A restored series continues exactly as the original.
func TestSeriesRestoreExact(t *testing.T) {
	p := params(3)
	rng := rand.New(rand.NewPCG(9, 9))
	a := NewSeries()
	var b *Series
	for m := int64(0); m < 20*24*60; m += 7 {
		v := 70 + 5*rng.NormFloat64() + float64(m)/(24*60)
		if m >= 3*24*60+7*60 && b == nil {
			var err error
			if b, err = FromProto(&p, a.ToProto("heart_rate")); err != nil {
				t.Fatal(err)
			}
		}
		a.Add(&p, m*minuteMs, v)
		if b != nil {
			b.Add(&p, m*minuteMs, v)
		}
	}
	if pa, pb := a.ToProto("heart_rate"), b.ToProto("heart_rate"); !proto.Equal(pa, pb) {
		t.Fatalf("restored series diverged:\n%v\n%v", pa, pb)
	}
	if !a.DriftDetail().Ready || a.DriftDetail() != b.DriftDetail() {
		t.Fatalf("drift detail %+v vs %+v", a.DriftDetail(), b.DriftDetail())
	}
	bad := a.ToProto("heart_rate")
	bad.BucketMedians = bad.BucketMedians[:5]
	if _, err := FromProto(&p, bad); err == nil {
		t.Fatal("a series with the wrong bucket count was restored")
	}
}
