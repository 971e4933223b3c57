package window

import (
	"math"
	"testing"
	"time"

	"github.com/apache/arrow/go/v17/arrow/memory"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/catalog"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// pt0 is a minute boundary.
var pt0 = time.Date(2026, 3, 2, 10, 0, 0, 0, time.UTC).UnixMilli()

func catInfo(name string) (MetricInfo, bool) {
	m, ok := catalog.Default().Lookup(name)
	if !ok {
		return MetricInfo{}, false
	}
	return MetricInfo{Unit: m.Unit, ExpectedInterval: time.Duration(m.ExpectedIntervalS * float64(time.Second))}, true
}

type feed struct {
	t   *testing.T
	e   *Engine
	p   *Patient
	b   *Batch
	mem *memory.CheckedAllocator
	out []*vigilv1.FeatureWindow
}

func newFeed(t *testing.T, specYAML string, ooo, late time.Duration) *feed {
	t.Helper()
	spec := DefaultSpec()
	if specYAML != "" {
		var err error
		if spec, err = ParseSpec([]byte(specYAML)); err != nil {
			t.Fatal(err)
		}
	}
	e, err := Compile(spec, Options{OutOfOrderness: ooo, AllowedLateness: late}, catInfo)
	if err != nil {
		t.Fatal(err)
	}
	mem := memory.NewCheckedAllocator(memory.NewGoAllocator())
	f := &feed{t: t, e: e, p: NewPatient(), b: NewBatch(mem), mem: mem}
	t.Cleanup(func() {
		f.b.Release()
		mem.AssertSize(t, 0)
	})
	return f
}

func (f *feed) add(metric string, atS, v float64) AddResult {
	mi, ok := f.e.Metric(metric)
	if !ok {
		f.t.Fatalf("metric %s not in spec", metric)
	}
	return f.e.Add(f.p, mi, pt0+int64(math.Round(atS*1000)), v)
}

// advance moves the watermark and returns the windows emitted.
func (f *feed) advance() []*vigilv1.FeatureWindow {
	f.e.Advance(f.p, f.b, "t", "p")
	return f.collect()
}

func (f *feed) collect() []*vigilv1.FeatureWindow {
	rec := f.b.NewRecord()
	defer rec.Release()
	fws, err := ToProto(rec, 0)
	if err != nil {
		f.t.Fatal(err)
	}
	f.out = append(f.out, fws...)
	return fws
}

func pnear(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Max(1, math.Abs(b)) }

func feat(fw *vigilv1.FeatureWindow, metric string) *vigilv1.Feature {
	for _, x := range fw.GetFeatures() {
		if x.Metric == metric {
			return x
		}
	}
	return nil
}

const hrOnly = `
version: 1
metrics:
  heart_rate: {decimals: 0}
windows:
  - {name: 1m, kind: tumbling, size: 1m, metrics: [heart_rate]}
`

func TestOutOfOrderInsideBound(t *testing.T) {
	f := newFeed(t, hrOnly, 5*time.Second, 0)
	f.add("heart_rate", 10, 70)
	f.add("heart_rate", 62, 80) // watermark 57 s: [0, 60) still open
	if got := f.advance(); len(got) != 0 {
		t.Fatalf("window closed before the watermark passed its end: %v", got)
	}
	// 30 s arrives after 62 s: out of order by 32 s, but its window is open.
	if r := f.add("heart_rate", 30, 74); r != Added {
		t.Fatalf("out-of-order sample: %v", r)
	}
	f.add("heart_rate", 66, 90) // watermark 61 s closes [0, 60)
	got := f.advance()
	if len(got) != 1 || got[0].StartMs != pt0 || got[0].EndMs != pt0+60000 || got[0].Version != 1 || got[0].WatermarkMs != pt0+61000 {
		t.Fatalf("windows %v", got)
	}
	hr := feat(got[0], "heart_rate")
	// 70 at 10 s, 74 at 30 s: mean 72, population std sqrt((4+4)/2) = 2,
	// slope 4 / (20 s = 1/3 min) = 12 /min, last 74 (30 s), 30 s before
	// the end; completeness 2 of 60 expected at 1 Hz.
	if hr.Count != 2 || hr.Mean != 72 || hr.Min != 70 || hr.Max != 74 || hr.Std != 2 || hr.Last != 74 ||
		hr.LastTimeMs != pt0+30000 || hr.FirstTimeMs != pt0+10000 || !pnear(hr.SlopePerMin, 12) || hr.Median != 72 ||
		hr.SinceLastMs != 30000 || !pnear(hr.Completeness, 2.0/60) || hr.Unit != "/min" {
		t.Errorf("heart rate %v", hr)
	}
}

func TestLateSampleCorrectionAndTooLate(t *testing.T) {
	f := newFeed(t, hrOnly, 5*time.Second, 2*time.Minute)
	f.add("heart_rate", 0, 60)
	f.add("heart_rate", 20, 64)
	f.add("heart_rate", 150, 80) // watermark 145 s closes [0, 60)
	got := f.advance()
	if len(got) != 1 || got[0].Version != 1 || feat(got[0], "heart_rate").Count != 2 || feat(got[0], "heart_rate").Mean != 62 {
		t.Fatalf("first emission %v", got)
	}
	// 71 at 40 s: [0, 60) closed at 60 s, allowed until 60+120 = 180 s > 145 s.
	if r := f.add("heart_rate", 40, 71); r != Added {
		t.Fatalf("late sample inside allowed lateness: %v", r)
	}
	got = f.advance()
	if len(got) != 1 || got[0].StartMs != pt0 || got[0].Version != 2 {
		t.Fatalf("correction %v", got)
	}
	hr := feat(got[0], "heart_rate")
	// 60 64 71: mean 195/3 = 65, median 64, last 71 at 40 s.
	if hr.Count != 3 || hr.Mean != 65 || hr.Median != 64 || hr.Max != 71 || hr.Last != 71 || hr.LastTimeMs != pt0+40000 {
		t.Errorf("corrected heart rate %v", hr)
	}
	// A second late sample: version 3.
	f.add("heart_rate", 50, 65)
	if got = f.advance(); len(got) != 1 || got[0].Version != 3 || feat(got[0], "heart_rate").Count != 4 {
		t.Fatalf("second correction %v", got)
	}
	// Watermark 190-5 = 185 s >= 180 s: [0, 60) is past allowed lateness.
	f.add("heart_rate", 190, 81)
	f.advance()
	if r := f.add("heart_rate", 10, 99); r != TooLate {
		t.Fatalf("sample beyond allowed lateness: %v, want TooLate", r)
	}
	if got = f.advance(); len(got) != 0 {
		t.Errorf("a too-late sample emitted %v", got)
	}
}

func TestPercentilesExact(t *testing.T) {
	f := newFeed(t, hrOnly, 0, 0)
	for i, v := range []float64{70, 72, 71, 75, 80, 71, 73, 90, 72, 74} {
		f.add("heart_rate", float64(i), v)
	}
	f.add("heart_rate", 60, 1)
	got := f.advance()
	hr := feat(got[0], "heart_rate")
	// Sorted: 70 71 71 72 72 73 74 75 80 90 (n 10), h = 9q:
	// median h 4.5 -> (72+73)/2; p05 h .45 -> 70+.45; p25 h 2.25 -> 71+.25;
	// p75 h 6.75 -> 74+.75; p95 h 8.55 -> 80 + .55*10.
	if hr.Median != 72.5 || !pnear(hr.P05, 70.45) || hr.P25 != 71.25 || hr.P75 != 74.75 || !pnear(hr.P95, 85.5) {
		t.Errorf("percentiles median %v p05 %v p25 %v p75 %v p95 %v", hr.Median, hr.P05, hr.P25, hr.P75, hr.P95)
	}
	// Mean 748/10; deviations -4.8 -2.8 -3.8 .2 5.2 -3.8 -1.8 15.2 -2.8 -.8,
	// squares sum to 329.6 -> std sqrt(32.96).
	if hr.Mean != 74.8 || !pnear(hr.Std, math.Sqrt(32.96)) || hr.Min != 70 || hr.Max != 90 {
		t.Errorf("mean %v std %v min %v max %v", hr.Mean, hr.Std, hr.Min, hr.Max)
	}
}

func TestHoppingMergesPanes(t *testing.T) {
	f := newFeed(t, "", 0, 0)
	// HR 60 in minute 0, 70 twice in minute 1, 80 in minute 4.
	f.add("heart_rate", 10, 60)
	f.add("heart_rate", 70, 70)
	f.add("heart_rate", 100, 70)
	f.add("heart_rate", 250, 80)
	f.add("heart_rate", 300, 90) // watermark 300 s: closes [0, 300)
	var five *vigilv1.FeatureWindow
	for _, fw := range f.advance() {
		if fw.Window == "5m" && fw.StartMs == pt0 {
			five = fw
		}
	}
	if five == nil || five.Kind != vigilv1.WindowKind_WINDOW_KIND_HOPPING || five.SizeMs != 300000 || five.StepMs != 60000 {
		t.Fatalf("5-minute window [0, 300 s): %v", five)
	}
	hr := feat(five, "heart_rate")
	// 60 70 70 80: mean 70, median 70, std sqrt(200/4), p25 h .75 -> 67.5.
	// Slope: x (min) 1/6, 7/6, 10/6, 25/6; mean x 43/24; Sxy = Σ(x-x̄)(y-70)
	// = (-39/24)(-10) + 0 + 0 + (57/24)(10) = 40; Sxx = Σ(x-x̄)² with
	// deviations -39 -15 -3 57 (/24) = (1521+225+9+3249)/576 = 5004/576.
	if hr.Count != 4 || hr.Mean != 70 || hr.Median != 70 || !pnear(hr.Std, math.Sqrt(50)) || hr.P25 != 67.5 ||
		!pnear(hr.SlopePerMin, 40/(5004.0/576)) || hr.Last != 80 {
		t.Errorf("hopping heart rate %v", hr)
	}
}

func TestDerivedFeatures(t *testing.T) {
	f := newFeed(t, "", 0, 0)
	f.add("systolic_bp", 5, 120)
	f.add("diastolic_bp", 5, 80)
	f.add("heart_rate", 5, 96)
	f.add("systolic_bp", 35, 110)
	f.add("diastolic_bp", 35, 70)
	f.add("heart_rate", 35, 84)
	f.add("heart_rate", 60, 84)
	var one *vigilv1.FeatureWindow
	for _, fw := range f.advance() {
		if fw.Window == "1m" {
			one = fw
		}
	}
	if one == nil {
		t.Fatal("no 1m window")
	}
	// Means: SBP 115, DBP 75, HR 90; lasts SBP 110, DBP 70, HR 84.
	// MAP = 75 + (115-75)/3 = 88.333..; last 70 + 40/3 = 83.333..
	// Pulse pressure 115-75 = 40; shock index 90/115, last 84/110.
	m := feat(one, DerivedMAP)
	if m == nil || !m.DerivedMetric || !pnear(m.Mean, 75+40.0/3) || !pnear(m.Last, 70+40.0/3) || m.Count != 2 || m.Unit != "mm[Hg]" {
		t.Errorf("derived MAP %v", m)
	}
	if pp := feat(one, DerivedPulsePressure); pp == nil || pp.Mean != 40 || pp.Last != 40 {
		t.Errorf("pulse pressure %v", pp)
	}
	if si := feat(one, DerivedShockIndex); si == nil || !pnear(si.Mean, 90.0/115) || !pnear(si.Last, 84.0/110) {
		t.Errorf("shock index %v", si)
	}
	// Measured MAP: no derived one.
	g := newFeed(t, "", 0, 0)
	g.add("systolic_bp", 5, 120)
	g.add("diastolic_bp", 5, 80)
	g.add("mean_arterial_pressure", 5, 95)
	g.add("heart_rate", 60, 80)
	for _, fw := range g.advance() {
		if m := feat(fw, DerivedMAP); m == nil || m.DerivedMetric || m.Mean != 95 {
			t.Errorf("%s: measured MAP replaced: %v", fw.Window, m)
		}
	}
}

func TestDesaturation(t *testing.T) {
	f := newFeed(t, "", 0, 0)
	// Minute 0: 60 samples at 97 -> baseline for minute 1 = 97, low <= 94.
	for s := 0; s < 60; s++ {
		f.add("spo2", float64(s), 97)
	}
	// Minute 1 (60..119 s): 93 from 70 to 81 s (12 samples, lasts 11 s:
	// an event, qualifying at 80 s), 94 from 100 to 105 s (lasts 5 s:
	// not an event), 97 otherwise.
	for s := 60; s < 120; s++ {
		v := 97.0
		if s >= 70 && s <= 81 {
			v = 93
		} else if s >= 100 && s <= 105 {
			v = 94
		}
		f.add("spo2", float64(s), v)
	}
	f.add("spo2", 120, 97)
	var one *vigilv1.FeatureWindow
	for _, fw := range f.advance() {
		if fw.Window == "1m" && fw.StartMs == pt0+60000 {
			one = fw
		}
	}
	sp := feat(one, "spo2")
	// 1 event in 1 minute: ODI 60 per hour. Values: 12 x 93, 6 x 94, 42 x
	// 97: mean (1116+564+4074)/60 = 95.9; median 97; p05 h 2.95 -> rank 2,
	// 93; p25 h 14.75 -> ranks 14 and 15, both 94 (ranks 12..17).
	if sp == nil || sp.Derived["desat_events"] != 1 || sp.Derived["odi_per_h"] != 60 || !pnear(sp.Mean, 95.9) ||
		sp.Median != 97 || sp.P05 != 93 || sp.P25 != 94 {
		t.Errorf("spo2 minute 1: %v", sp)
	}
	if sp0 := feat(f.out[0], "spo2"); sp0 == nil || sp0.Derived["desat_events"] != 0 {
		t.Errorf("minute 0 (no baseline yet): %v", sp0)
	}
}

func TestWearTimeAndHRV(t *testing.T) {
	f := newFeed(t, `
version: 1
metrics:
  steps: {decimals: 0, wear_time: {max_gap: 15s}}
  rr_interval: {decimals: 0, hrv: true}
windows:
  - {name: 1m, kind: tumbling, size: 1m, metrics: [steps, rr_interval]}
`, 0, 0)
	// Steps at 0 10 20 30 50 s: gaps 10 10 10 (worn) and 20 (> 15 s): 30 s.
	for _, s := range []float64{0, 10, 20, 30, 50} {
		f.add("steps", s, 12)
	}
	// RR 800 810 790 850 800 ms, out of arrival order (850 arrives last).
	for i, rr := range []float64{800, 810, 790, 0, 800} {
		if rr > 0 {
			f.add("rr_interval", float64(i)+0.5, rr)
		}
	}
	f.add("rr_interval", 3.5, 850)
	f.add("steps", 60, 1)
	got := f.advance()
	if st := feat(got[0], "steps"); st == nil || st.Derived["wear_time_s"] != 30 {
		t.Errorf("steps %v", st)
	}
	rr := feat(got[0], "rr_interval")
	// Mean 4050/5 = 810; deviations -10 0 -20 40 -10 -> SDNN sqrt(2200/4);
	// successive differences 10 -20 60 -50 -> RMSSD sqrt(6600/4); one of
	// four above 50 ms -> pNN50 25 %.
	if rr == nil || rr.Derived["hrv_mean_nn_ms"] != 810 || !pnear(rr.Derived["hrv_sdnn_ms"], math.Sqrt(550)) ||
		!pnear(rr.Derived["hrv_rmssd_ms"], math.Sqrt(1650)) || rr.Derived["hrv_pnn50_pct"] != 25 {
		t.Errorf("rr_interval %v", rr)
	}
}

func TestSessionWindow(t *testing.T) {
	f := newFeed(t, "", 0, 0)
	// Steps every minute from 0 to 5 min, then silence: the session is
	// [0, 5 min + 10 min gap) and closes when the watermark reaches 15 min.
	for m := 0; m <= 5; m++ {
		f.add("steps", float64(60*m), float64(10*m))
	}
	f.add("heart_rate", 899, 70)
	for _, fw := range f.advance() {
		if fw.Window == "activity" {
			t.Fatalf("session closed early: %v", fw)
		}
	}
	f.add("heart_rate", 900, 70)
	var sess *vigilv1.FeatureWindow
	for _, fw := range f.advance() {
		if fw.Window == "activity" {
			sess = fw
		}
	}
	// 0 10 20 30 40 50 at 0..5 min: mean 25, slope 10 per minute.
	if sess == nil || sess.StartMs != pt0 || sess.EndMs != pt0+900000 || sess.Kind != vigilv1.WindowKind_WINDOW_KIND_SESSION {
		t.Fatalf("session %v", sess)
	}
	if st := feat(sess, "steps"); st.Count != 6 || st.Mean != 25 || !pnear(st.SlopePerMin, 10) || st.Median != 25 {
		t.Errorf("session steps %v", st)
	}
}

func TestFlushClosesEverything(t *testing.T) {
	f := newFeed(t, "", 5*time.Second, time.Minute)
	f.add("heart_rate", 10, 70)
	f.add("steps", 20, 5)
	f.e.Flush(f.p, f.b, "t", "p")
	got := f.collect()
	// 1m [0,60): HR and steps; 5m windows starting -4..0 min; the session.
	var ones, fives, sessions int
	for _, fw := range got {
		switch fw.Window {
		case "1m":
			ones++
		case "5m":
			fives++
		case "activity":
			sessions++
		}
	}
	if ones != 1 || fives != 5 || sessions != 1 {
		t.Errorf("flush: %d 1m, %d 5m, %d sessions; want 1, 5, 1", ones, fives, sessions)
	}
}

func TestStateRoundTrip(t *testing.T) {
	// Every sample through the changelog encoding gives the same output as
	// the uninterrupted run.
	run := func(roundTrip bool) []*vigilv1.FeatureWindow {
		f := newFeed(t, "", 5*time.Second, time.Minute)
		for i := 0; i < 900; i++ {
			at := float64(i)
			if i%7 == 3 {
				at -= 4 // out of order
			}
			f.add("heart_rate", at, float64(70+i%9))
			f.add("spo2", at, float64(97-(i/15)%5))
			if i%60 == 0 {
				f.add("steps", at, float64(i%100))
				f.add("rr_interval", at, float64(800+i%50))
			}
			if i%200 == 150 {
				f.add("heart_rate", at-100, 200) // late: a correction
			}
			f.advance()
			if roundTrip {
				var ps vigilv1.PatientState
				f.e.ToProto(f.p, &ps)
				p, err := f.e.FromProto(&ps)
				if err != nil {
					t.Fatal(err)
				}
				f.p = p
			}
		}
		f.e.Flush(f.p, f.b, "t", "p")
		f.collect()
		return f.out
	}
	a, b := run(false), run(true)
	if len(a) != len(b) || len(a) < 30 {
		t.Fatalf("%d vs %d windows", len(a), len(b))
	}
	for i := range a {
		if !protoEqual(a[i], b[i]) {
			t.Fatalf("window %d differs after restore:\n%v\n%v", i, a[i], b[i])
		}
	}
}

func protoEqual(a, b *vigilv1.FeatureWindow) bool { return proto.Equal(a, b) }

// st0 is minute-aligned: 1.8e12 ms = 30,000,000 minutes.
const st0 = int64(1_800_000_000_000)

func TestStartAlignsToEpoch(t *testing.T) {
	cases := []struct{ t, size, want int64 }{
		{st0, 60000, st0},
		{st0 + 59999, 60000, st0},
		{st0 + 60000, 60000, st0 + 60000},
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
