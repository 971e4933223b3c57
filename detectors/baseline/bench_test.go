package baseline

import (
	"math/rand/v2"
	"runtime"
	"testing"
)

// BenchmarkBaselineMemory measures the heap a patient's baselines of 8
// metrics hold once their 24-hour span is full (default settings: 144
// ten-minute buckets fed by 1-minute window means), and reports it per
// patient and extrapolated to 10,000 patients.
func BenchmarkBaselineMemory(b *testing.B) {
	const patients, metrics = 200, 8
	p := params(3)
	for range b.N {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		all := make([][metrics]*Series, patients)
		rng := rand.New(rand.NewPCG(1, 1))
		for i := range all {
			for k := range all[i] {
				s := NewSeries()
				for m := int64(0); m < 25*60+5; m++ {
					s.Add(&p, m*minuteMs, 70+5*rng.NormFloat64())
				}
				all[i][k] = s
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		per := float64(after.HeapAlloc-before.HeapAlloc) / patients
		b.ReportMetric(per, "bytes/patient")
		b.ReportMetric(per*10000/(1<<20), "MiB/10k-patients")
		runtime.KeepAlive(all)
	}
}

// BenchmarkSeriesAdd is the cost of feeding one window value (a bucket's
// baseline is recomputed every 10th).
func BenchmarkSeriesAdd(b *testing.B) {
	p := params(3)
	s := NewSeries()
	rng := rand.New(rand.NewPCG(1, 1))
	vs := make([]float64, 4096)
	for i := range vs {
		vs[i] = 70 + 5*rng.NormFloat64()
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		s.Add(&p, int64(i)*minuteMs, vs[i%len(vs)])
	}
}
