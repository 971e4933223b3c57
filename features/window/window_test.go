package window

import (
	"math"
	"testing"
	"time"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// t0 is minute-aligned: 1.8e12 ms = 30,000,000 minutes.
const t0 = int64(1_800_000_000_000)

func near(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Max(1, math.Abs(b)) }

func TestStartAlignsToEpoch(t *testing.T) {
	cases := []struct{ t, size, want int64 }{
		{t0, 60000, t0},
		{t0 + 59999, 60000, t0},
		{t0 + 60000, 60000, t0 + 60000},
		{0, 60000, 0},
		{-1, 60000, -60000},
		{-60000, 60000, -60000},
		{-60001, 60000, -120000},
		{90_000, 30_000, 90_000},
	}
	for _, c := range cases {
		if got := Start(c.t, c.size); got != c.want {
			t.Errorf("Start(%d, %d) = %d, want %d", c.t, c.size, got, c.want)
		}
	}
}

// TestHandComputed checks one window of four heart-rate samples against
// values worked out by hand:
//
//	values 118, 122, 126, 131 at +0, +15, +30, +45 s
//	mean 497/4 = 124.25; deviations -6.25 -2.25 1.75 6.75; squares sum 92.75
//	population std sqrt(92.75/4) = sqrt(23.1875)
//	x (minutes) 0 .25 .5 .75, mean .375: Sxx .3125, Sxy 5.375, slope 17.2 /min
func TestHandComputed(t *testing.T) {
	s := NewSet(time.Minute)
	// Added out of order: last must follow event time, not arrival.
	for _, x := range []struct {
		at int64
		v  float64
	}{{45000, 131}, {0, 118}, {30000, 126}, {15000, 122}} {
		s.Add("heart_rate", "/min", t0+x.at, x.v)
	}
	var got []Agg
	n := s.Close(t0+60000, func(start, end int64, aggs []Agg) {
		if start != t0 || end != t0+60000 {
			t.Errorf("window [%d, %d), want [%d, %d)", start, end, t0, t0+60000)
		}
		got = append(got, aggs...)
	})
	if n != 1 || len(got) != 1 {
		t.Fatalf("closed %d ends with %d aggregates, want 1 and 1", n, len(got))
	}
	f := got[0].Feature(15 * time.Second)
	if f.Metric != "heart_rate" || f.Unit != "/min" || f.Count != 4 {
		t.Errorf("metric/unit/count: %s %s %d", f.Metric, f.Unit, f.Count)
	}
	checks := []struct {
		name      string
		got, want float64
	}{
		{"mean", f.Mean, 124.25},
		{"min", f.Min, 118},
		{"max", f.Max, 131},
		{"last", f.Last, 131},
		{"std", f.Std, math.Sqrt(23.1875)},
		{"slope", f.SlopePerMin, 17.2},
		{"completeness", f.Completeness, 1},
		{"sum", got[0].Sum, 497},
	}
	for _, c := range checks {
		if !near(c.got, c.want) {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	if f.FirstTimeMs != t0 || f.LastTimeMs != t0+45000 {
		t.Errorf("first/last time %d %d, want %d %d", f.FirstTimeMs, f.LastTimeMs, t0, t0+45000)
	}
	if s.Len() != 0 {
		t.Errorf("%d windows left open after close", s.Len())
	}
	if c := got[0].Feature(time.Second).Completeness; !near(c, 4.0/60) {
		t.Errorf("completeness at 1 Hz = %v, want 4/60", c)
	}
	if c := got[0].Feature(0).Completeness; c != -1 {
		t.Errorf("completeness with unknown rate = %v, want -1", c)
	}
}

func TestLastTiesGoToLaterArrival(t *testing.T) {
	var a Agg
	a.Start, a.End = t0, t0+60000
	a.Add(t0+1000, 95)
	a.Add(t0+1000, 97)
	a.Add(t0+500, 99) // older: not last
	if a.Last != 97 || a.LastTime != t0+1000 {
		t.Errorf("last %v at %d, want 97 at %d", a.Last, a.LastTime, t0+1000)
	}
	if a.FirstTime != t0+500 || a.Min != 95 || a.Max != 99 {
		t.Errorf("first %d min %v max %v", a.FirstTime, a.Min, a.Max)
	}
}

func TestSingleSampleAndFlatWindow(t *testing.T) {
	var a Agg
	a.Start, a.End = t0, t0+60000
	a.Add(t0+10000, 37.2)
	if a.Std() != 0 || a.Slope() != 0 || a.Mean != 37.2 {
		t.Errorf("one sample: std %v slope %v mean %v", a.Std(), a.Slope(), a.Mean)
	}
	a.Add(t0+10000, 37.4) // same time: no spread in x, slope undefined -> 0
	if a.Slope() != 0 {
		t.Errorf("slope with one distinct time = %v, want 0", a.Slope())
	}
	if !near(a.Std(), 0.1) {
		t.Errorf("std of 37.2, 37.4 = %v, want 0.1", a.Std())
	}
}

// TestCloseOrdersByEndThenMetric closes several windows at once.
func TestCloseOrdersByEndThenMetric(t *testing.T) {
	s := NewSet(time.Minute)
	s.Add("spo2", "%", t0+61000, 95)
	s.Add("heart_rate", "/min", t0+61000, 80)
	s.Add("spo2", "%", t0+1000, 96)
	s.Add("spo2", "%", t0+121000, 94) // stays open
	s.Add("heart_rate", "/min", t0+2000, 81)
	if e, ok := s.MinEnd(); !ok || e != t0+60000 {
		t.Errorf("MinEnd %d %v", e, ok)
	}
	type closed struct {
		end     int64
		metrics []string
	}
	var got []closed
	s.Close(t0+120000, func(_, end int64, aggs []Agg) {
		c := closed{end: end}
		for _, a := range aggs {
			c.metrics = append(c.metrics, a.Metric)
		}
		got = append(got, c)
	})
	want := []closed{{t0 + 60000, []string{"heart_rate", "spo2"}}, {t0 + 120000, []string{"heart_rate", "spo2"}}}
	if len(got) != len(want) {
		t.Fatalf("closed %v, want %v", got, want)
	}
	for i := range want {
		if got[i].end != want[i].end || len(got[i].metrics) != 2 || got[i].metrics[0] != want[i].metrics[0] || got[i].metrics[1] != want[i].metrics[1] {
			t.Errorf("close %d: %v, want %v", i, got[i], want[i])
		}
	}
	if s.Len() != 1 {
		t.Errorf("open after close: %d, want 1", s.Len())
	}
	if n := s.Close(t0+179999, func(int64, int64, []Agg) { t.Error("closed a window before its end") }); n != 0 {
		t.Errorf("closed %d", n)
	}
}

// TestProtoRoundTripContinuesExactly serialises a Set mid-window, restores
// it, continues both, and requires bit-identical aggregates.
func TestProtoRoundTripContinuesExactly(t *testing.T) {
	a := NewSet(time.Minute)
	vals := []float64{36.61, 36.72, 36.93, 37.04, 37.11, 36.98, 37.3}
	for i, v := range vals[:4] {
		a.Add("body_temperature", "Cel", t0+int64(i)*7001, v)
		a.Add("heart_rate", "/min", t0+int64(i)*7001+3, v*3.1)
	}
	ws := a.AppendProto(nil)
	if len(ws) != 2 || ws[0].Metric != "body_temperature" {
		t.Fatalf("proto: %v", ws)
	}
	b := NewSet(time.Minute)
	if err := b.Restore(ws); err != nil {
		t.Fatal(err)
	}
	for i, v := range vals[4:] {
		at := t0 + int64(i+4)*7001
		a.Add("body_temperature", "Cel", at, v)
		b.Add("body_temperature", "Cel", at, v)
		a.Add("heart_rate", "/min", at+3, v*3.1)
		b.Add("heart_rate", "/min", at+3, v*3.1)
	}
	var ga, gb []Agg
	a.Close(t0+60000, func(_, _ int64, aggs []Agg) { ga = append(ga, aggs...) })
	b.Close(t0+60000, func(_, _ int64, aggs []Agg) { gb = append(gb, aggs...) })
	if len(ga) != 2 || len(gb) != 2 {
		t.Fatalf("closed %d and %d", len(ga), len(gb))
	}
	for i := range ga {
		if ga[i] != gb[i] {
			t.Errorf("restored aggregate differs:\n got %+v\nwant %+v", gb[i], ga[i])
		}
	}
}

func TestRestoreRefusesOtherWindowSize(t *testing.T) {
	s := NewSet(time.Minute)
	err := s.Restore([]*vigilv1.OpenWindow{{Metric: "spo2", StartMs: t0, EndMs: t0 + 30000, Count: 1}})
	if err == nil {
		t.Fatal("a 30 s window restored into a 1 min set")
	}
	if err := s.Restore([]*vigilv1.OpenWindow{{Metric: "spo2", StartMs: t0 + 1, EndMs: t0 + 60001, Count: 1}}); err == nil {
		t.Fatal("an unaligned window restored")
	}
}

func TestAddDoesNotAllocateInSteadyState(t *testing.T) {
	s := NewSet(time.Minute)
	metrics := []string{"heart_rate", "spo2", "respiratory_rate"}
	for _, m := range metrics {
		s.Add(m, "", t0, 1)
	}
	i := int64(0)
	allocs := testing.AllocsPerRun(1000, func() {
		i++
		s.Add(metrics[i%3], "", t0+i%60000, float64(i))
	})
	if allocs != 0 {
		t.Errorf("Add into an open window allocates %v times", allocs)
	}
}

// BenchmarkAggregator measures samples/s through the aggregator alone: 1000
// patients, 6 metrics at 1 Hz, windows closed every minute.
func BenchmarkAggregator(b *testing.B) {
	const patients = 1000
	metrics := []string{"heart_rate", "spo2", "respiratory_rate", "systolic_bp", "body_temperature", "consciousness"}
	sets := make([]*Set, patients)
	for i := range sets {
		sets[i] = NewSet(time.Minute)
	}
	var f vigilv1.Feature
	emit := func(_, _ int64, aggs []Agg) {
		for i := range aggs {
			aggs[i].FillFeature(&f, time.Second)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	n := 0
	for sec := int64(0); n < b.N; sec++ {
		at := t0 + sec*1000
		for p := 0; p < patients && n < b.N; p++ {
			s := sets[p]
			for _, m := range metrics {
				s.Add(m, "", at, float64(sec%97))
			}
			n += len(metrics)
			if sec%60 == 0 { // watermark at the minute: the previous window closes
				s.Close(at, emit)
			}
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "samples/s")
}
