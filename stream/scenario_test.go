package stream

import (
	"context"
	"fmt"
	"math"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/detectors/alerting"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

// The known scenario: one patient, three minutes of vitals, with default
// settings (1-minute windows, 5 s out-of-orderness, 1 h staleness).
//
//	minute 0 [t0, +60s): well. HR 80 82 84 86 at +0 +15 +30 +45; RR 16 (+0),
//	  18 (+30); SpO2 97 (+0) 97 (+15) 96 (+45); SBP 120, 37.0 °C, Alert at +0.
//	  NEWS2 at +0: 0, low (air/oxygen missing).
//	minute 1: +60 HR 112 RR 22 SpO2 95 -> 2+2+1 = 5 medium: alert raised.
//	  +65 HR 120 SpO2 93 -> 6 medium (watermark +60 s closes minute 0;
//	  its window-end score at +60 s is the change score already emitted).
//	  +80 HR 135 RR 26 SpO2 91 SBP 95 38.6 °C -> 3+3+3+2+1 = 12 high.
//	  +100 HR 133: same bands, no score.
//	minute 2: +125 recovery HR 75 RR 16 SpO2 97 SBP 118 37.2 °C (closes
//	  minute 1: window-end score at +120 s = 12 high; then 0 low at +125:
//	  alert resolved). +140 a batch with SpO2 at +50 s (too late: minute 0
//	  closed at +60 s and the watermark, +120 s, is allowed_lateness (60 s)
//	  past that) and HR 76. +190 HR 74 closes minute 2: window-end score 0
//	  at +180 s; no change score.
//
// The default window spec also has 5-minute windows hopping by a minute:
// those ending at +60, +120 and +180 s close with the 1-minute ones.
var t0 = time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC).UnixMilli()

type smp struct {
	metric string
	v      float64
	atS    float64 // seconds after t0
}

// scenarioBatches returns the scenario's batches (one device message each),
// ingested 200 ms after their newest sample.
func scenarioBatches(tenant, patient string) []*vigilv1.SampleBatch {
	msgs := [][]smp{
		{{"heart_rate", 80, 0}, {"respiratory_rate", 16, 0}, {"spo2", 97, 0}, {"systolic_bp", 120, 0}, {"body_temperature", 37.0, 0}, {"consciousness", 0, 0}},
		{{"heart_rate", 82, 15}, {"spo2", 97, 15}},
		{{"heart_rate", 84, 30}, {"respiratory_rate", 18, 30}},
		{{"heart_rate", 86, 45}, {"spo2", 96, 45}},
		{{"heart_rate", 112, 60}, {"respiratory_rate", 22, 60}, {"spo2", 95, 60}},
		{{"heart_rate", 120, 65}, {"spo2", 93, 65}},
		{{"heart_rate", 135, 80}, {"respiratory_rate", 26, 80}, {"spo2", 91, 80}, {"systolic_bp", 95, 80}, {"body_temperature", 38.6, 80}},
		{{"heart_rate", 133, 100}},
		{{"heart_rate", 75, 125}, {"respiratory_rate", 16, 125}, {"spo2", 97, 125}, {"systolic_bp", 118, 125}, {"body_temperature", 37.2, 125}},
		{{"spo2", 98, 50}, {"heart_rate", 76, 140}},
		{{"heart_rate", 74, 190}},
	}
	out := make([]*vigilv1.SampleBatch, len(msgs))
	for i, m := range msgs {
		b := &vigilv1.SampleBatch{SchemaVersion: 1, Tenant: tenant, Patient: patient, Device: "bed-7",
			Source: vigilv1.Source_SOURCE_HTTP, MessageId: "m" + string(rune('a'+i))}
		var newest int64
		for _, s := range m {
			at := t0 + int64(s.atS*1000)
			newest = max(newest, at)
			b.Samples = append(b.Samples, &vigilv1.Sample{Metric: s.metric, Value: s.v, EventTimeMs: at})
		}
		b.IngestTimeMs = newest + 200
		out[i] = b
	}
	return out
}

func approx(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Max(1, math.Abs(b)) }

func feature(fw *vigilv1.FeatureWindow, metric string) *vigilv1.Feature {
	for _, f := range fw.GetFeatures() {
		if f.GetMetric() == metric {
			return f
		}
	}
	return nil
}

// checkScenario checks the outputs of the scenario against the values
// worked out by hand above.
func checkScenario(t *testing.T, fws []*vigilv1.FeatureWindow, scores []*vigilv1.Score, alerts []*vigilv1.AlertEvent, dls []*vigilv1.DeadLetter) {
	t.Helper()
	var fives []*vigilv1.FeatureWindow
	all := fws
	fws = nil
	for _, fw := range all {
		switch fw.Window {
		case "1m":
			fws = append(fws, fw)
		case "5m":
			fives = append(fives, fw)
		default:
			t.Errorf("window %s: %v", fw.Window, fw)
		}
	}
	checkFiveMinutes(t, fives)
	// Features: minutes 0, 1 and 2 closed; minute 3 still open.
	if len(fws) != 3 {
		t.Fatalf("%d 1-minute feature windows, want 3", len(fws))
	}
	for i, fw := range fws {
		if fw.StartMs != t0+int64(i)*60000 || fw.EndMs != fw.StartMs+60000 || fw.SizeMs != 60000 || fw.Version != 1 ||
			fw.Kind != vigilv1.WindowKind_WINDOW_KIND_TUMBLING || fw.Patient != "p-001" || fw.Tenant != "st-mary" {
			t.Errorf("window %d header: %v", i, fw)
		}
	}
	// Six measured metrics, then the derived shock index (HR 83 / SBP 120).
	if got := len(fws[0].Features); got != 7 {
		t.Errorf("minute 0 has %d features, want 7", got)
	} else if si := fws[0].Features[6]; si.Metric != "shock_index" || !si.DerivedMetric || !approx(si.Mean, 83.0/120) || si.Last != 86.0/120 {
		t.Errorf("minute 0 shock index %v", si)
	}
	type want struct {
		count                          uint64
		mean, min, max, std, last, slp float64
	}
	checks := []struct {
		win    int
		metric string
		w      want
	}{
		// HR 80 82 84 86 at 0 15 30 45 s: deviations -3 -1 1 3 -> var 20/4;
		// x .25 min apart -> Sxy 2.5 / Sxx .3125 = 8 /min.
		{0, "heart_rate", want{4, 83, 80, 86, math.Sqrt(5), 86, 8}},
		// RR 16 at 0 s, 18 at 30 s: std 1, slope 2 per half minute = 4 /min.
		{0, "respiratory_rate", want{2, 17, 16, 18, 1, 18, 4}},
		// SpO2 97 97 96 at 0 15 45 s: mean 290/3, var (1/9+1/9+4/9)/3,
		// slope (-5/12)/(7/24) = -10/7 /min.
		{0, "spo2", want{3, 290.0 / 3, 96, 97, math.Sqrt(2.0 / 9), 96, -10.0 / 7}},
		{0, "body_temperature", want{1, 37, 37, 37, 0, 37, 0}},
		// HR 112 120 135 133: mean 125, deviations -13 -5 10 8 -> var 358/4.
		{1, "heart_rate", want{4, 125, 112, 135, math.Sqrt(89.5), 133, math.NaN()}},
		// HR 75 at 125 s, 76 at 140 s: slope 1 per quarter minute = 4 /min.
		{2, "heart_rate", want{2, 75.5, 75, 76, 0.5, 76, 4}},
	}
	for _, c := range checks {
		f := feature(fws[c.win], c.metric)
		if f == nil {
			t.Errorf("minute %d: no %s feature", c.win, c.metric)
			continue
		}
		if f.Count != c.w.count || !approx(f.Mean, c.w.mean) || f.Min != c.w.min || f.Max != c.w.max ||
			!approx(f.Std, c.w.std) || f.Last != c.w.last || (!math.IsNaN(c.w.slp) && !approx(f.SlopePerMin, c.w.slp)) {
			t.Errorf("minute %d %s: count %d mean %v min %v max %v std %v last %v slope %v; want %+v",
				c.win, c.metric, f.Count, f.Mean, f.Min, f.Max, f.Std, f.Last, f.SlopePerMin, c.w)
		}
	}
	if f := feature(fws[0], "heart_rate"); f != nil && (f.FirstTimeMs != t0 || f.LastTimeMs != t0+45000 || f.Unit != "/min" || !approx(f.Completeness, 4.0/60)) {
		t.Errorf("minute 0 heart rate times/unit/completeness: %d %d %q %v", f.FirstTimeMs, f.LastTimeMs, f.Unit, f.Completeness)
	}
	if f := feature(fws[2], "spo2"); f == nil || f.Count != 1 || f.Last != 97 {
		t.Errorf("minute 2 SpO2 (the too-late sample must not be in any window): %v", f)
	}

	// Scores: the published chart for each state of the vitals (NEWS2;
	// the other tables: scores_test.go).
	scores = onlyKind(scores, "news2")
	type sc struct {
		atS   int64
		value float64
		band  string
	}
	wantScores := []sc{{0, 0, "low"}, {60, 5, "medium"}, {65, 6, "medium"}, {80, 12, "high"}, {120, 12, "high"}, {125, 0, "low"}, {180, 0, "low"}}
	if len(scores) != len(wantScores) {
		for _, s := range scores {
			t.Logf("score at +%ds: %v %s", (s.EventTimeMs-t0)/1000, s.Value, s.Band)
		}
		t.Fatalf("%d scores, want %d", len(scores), len(wantScores))
	}
	for i, w := range wantScores {
		s := scores[i]
		if s.EventTimeMs != t0+w.atS*1000 || s.Value != w.value || s.Band != w.band || s.Kind != "news2" || s.RulesetHash == "" || s.Id == "" {
			t.Errorf("score %d: +%ds %v %s, want +%ds %v %s", i, (s.EventTimeMs-t0)/1000, s.Value, s.Band, w.atS, w.value, w.band)
		}
	}
	high := scores[3]
	wantPoints := map[string]float64{"pulse": 3, "respiration_rate": 3, "spo2": 3, "systolic_bp": 2, "temperature": 1, "consciousness": 0}
	for _, c := range high.Components {
		if p, ok := wantPoints[c.Parameter]; ok && c.Points != p {
			t.Errorf("score 12 component %s: %v points, want %v", c.Parameter, c.Points, p)
		}
		if c.Parameter == "pulse" && (c.InputValue != 135 || c.InputTimeMs != t0+80000 || c.Band != ">=131") {
			t.Errorf("pulse component %v", c)
		}
	}
	if len(high.Missing) != 1 || high.Missing[0] != "air_or_oxygen" {
		t.Errorf("missing %v, want [air_or_oxygen]", high.Missing)
	}
	// The window-end score at +120 s used the values as of the window end.
	if c := scores[4].Components[4]; c.Parameter != "pulse" || c.InputValue != 133 || c.InputTimeMs != t0+100000 {
		t.Errorf("window-end score pulse input %v", c)
	}

	// Alerts: raised once at +60 s, not repeated, resolved at +125 s.
	if len(alerts) != 2 {
		t.Fatalf("%d alert events, want 2 (raised, resolved)", len(alerts))
	}
	r, s := alerts[0], alerts[1]
	if r.Type != vigilv1.AlertEventType_ALERT_EVENT_RAISED || r.Rule != alerting.RuleNEWS2Aggregate || r.Severity != "medium" ||
		r.EventTimeMs != t0+60000 || r.TriggerIngestTimeMs != t0+60200 || r.Score.GetValue() != 5 || r.RulesetHash == "" {
		t.Errorf("raised: %v", r)
	}
	if s.Type != vigilv1.AlertEventType_ALERT_EVENT_RESOLVED || s.AlertId != r.AlertId || s.EventTimeMs != t0+125000 || s.Score.GetValue() != 0 {
		t.Errorf("resolved: %v", s)
	}

	// Dead letters: the SpO2 sample for minute 0, after minute 0 closed.
	if len(dls) != 1 {
		t.Fatalf("%d dead letters, want 1", len(dls))
	}
	d := dls[0]
	if d.Reason != "too_late" || d.Field != "samples[0]" || len(d.Batch.GetSamples()) != 1 ||
		d.Batch.Samples[0].EventTimeMs != t0+50000 || d.Batch.Samples[0].Metric != "spo2" || d.Patient != "p-001" || d.MessageId != "mj" {
		t.Errorf("dead letter: %v", d)
	}
}

// checkFiveMinutes checks the scenario's 5-minute hopping windows: those
// ending at +60, +120 and +180 s hold minutes 0, 0-1 and 0-2.
func checkFiveMinutes(t *testing.T, fives []*vigilv1.FeatureWindow) {
	t.Helper()
	if len(fives) != 3 {
		t.Fatalf("%d 5-minute feature windows, want 3", len(fives))
	}
	for i, fw := range fives {
		end := t0 + int64(i+1)*60000
		if fw.EndMs != end || fw.StartMs != end-300000 || fw.SizeMs != 300000 || fw.StepMs != 60000 ||
			fw.Kind != vigilv1.WindowKind_WINDOW_KIND_HOPPING || fw.Version != 1 {
			t.Errorf("5-minute window %d header: %v", i, fw)
		}
	}
	type want struct {
		count                   uint64
		mean, median, last, min float64
	}
	checks := []struct {
		win    int
		metric string
		w      want
	}{
		// Minute 0 alone: HR 80 82 84 86.
		{0, "heart_rate", want{4, 83, 83, 86, 80}},
		// Minutes 0-1: HR 80 82 84 86 112 120 135 133: 832/8 = 104;
		// median (86+112)/2 = 99; last 133 (+100 s).
		{1, "heart_rate", want{8, 104, 99, 133, 80}},
		// Minutes 0-2: + 75 76: 983/10 = 98.3; sorted 75 76 80 82 84 | 86
		// 112 ...: median 85.
		{2, "heart_rate", want{10, 98.3, 85, 76, 75}},
		// SpO2 97 97 96, 95 93 91, 97 (the too-late 98 is not there):
		// 666/7; sorted 91 93 95 96 97 97 97: median 96.
		{2, "spo2", want{7, 666.0 / 7, 96, 97, 91}},
		// SBP 120 (+0), 95 (+80), 118 (+125).
		{2, "systolic_bp", want{3, 111, 118, 118, 95}},
	}
	for _, c := range checks {
		f := feature(fives[c.win], c.metric)
		if f == nil || f.Count != c.w.count || !approx(f.Mean, c.w.mean) || f.Median != c.w.median || f.Last != c.w.last || f.Min != c.w.min {
			t.Errorf("5-minute window %d %s: %v; want %+v", c.win, c.metric, f, c.w)
		}
	}
	// Shock index HR/SBP of minutes 0-1: 104 / ((120+95)/2).
	if si := feature(fives[1], "shock_index"); si == nil || !si.DerivedMetric || !approx(si.Mean, 104/107.5) || si.Count != 2 {
		t.Errorf("5-minute window 1 shock index: %v", si)
	}
	// No diastolic pressure: no pulse pressure nor derived MAP.
	if pp := feature(fives[2], "pulse_pressure"); pp != nil {
		t.Errorf("pulse pressure without diastolic pressure: %v", pp)
	}
}

// startClocked starts a processor whose processing time is clk (the idle
// timeout's clock).
func startClocked(t testing.TB, cfg config.Config, instance string, clk clock.Clock) *running {
	t.Helper()
	cfg.Stream.InstanceID = instance
	reg := prometheus.NewRegistry()
	p, err := New(cfg, stage.Deps{Log: infoLogger(t), Metrics: reg, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{p: p, reg: reg, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- p.Run(ctx) }()
	t.Cleanup(func() {
		r.cancel()
		select {
		case <-r.done:
		case <-time.After(30 * time.Second):
		}
		_ = r.p.Close(context.Background())
	})
	return r
}

// hrAt is one batch of one device message: heart rates at seconds after
// base.
func hrAt(patient string, base int64, msg string, vs ...smp) *vigilv1.SampleBatch {
	b := &vigilv1.SampleBatch{SchemaVersion: 1, Tenant: "st-mary", Patient: patient, Device: "bed-1",
		Source: vigilv1.Source_SOURCE_HTTP, MessageId: msg}
	var newest int64
	for _, s := range vs {
		at := base + int64(s.atS*1000)
		newest = max(newest, at)
		b.Samples = append(b.Samples, &vigilv1.Sample{Metric: s.metric, Value: s.v, EventTimeMs: at})
	}
	b.IngestTimeMs = newest + 100
	return b
}

// waitFeatures reads the features topic (read-committed) until it holds at
// least n windows.
func waitFeatures(t *testing.T, cfg config.Config, n int, timeout time.Duration) []*vigilv1.FeatureWindow {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		fws := decode(t, testenv.ReadAll(t, cfg.Kafka.Brokers[0], cfg.Kafka.Topics.Features), func() *vigilv1.FeatureWindow { return &vigilv1.FeatureWindow{} })
		if len(fws) >= n {
			return fws
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d feature windows on the topic after %s, want %d", len(fws), timeout, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func only(fws []*vigilv1.FeatureWindow, window string) []*vigilv1.FeatureWindow {
	var out []*vigilv1.FeatureWindow
	for _, fw := range fws {
		if fw.Window == window {
			out = append(out, fw)
		}
	}
	return out
}

// TestLatenessThroughKafkaAndClickHouse runs one patient's heart rate
// through the processor on the embedded broker and the sink into
// ClickHouse, with the default settings (out-of-orderness 5 s, allowed
// lateness 60 s):
//
//	m1: 70 at +10 s, 80 at +62 s       watermark +57 s: nothing closes
//	m2: 74 at +30 s                    32 s out of order, inside the bound:
//	                                   [0, 60 s) is open
//	m3: 90 at +66 s                    watermark +61 s closes [0, 60 s):
//	                                   70 74 -> mean 72, std 2, slope 12/min
//	m4: 71 at +40 s                    late (closed at +60 s) but within 60 s
//	                                   of it: version 2 with 70 74 71 ->
//	                                   mean 215/3, median 71, last 71 (+40 s)
//	m5: 100 at +125 s                  watermark +120 s closes [60, 120 s):
//	                                   80 90 -> mean 85
//	m6: 60 at +20 s                    [0, 60 s) closed 60 s before the
//	                                   watermark: too_late dead letter
func TestLatenessThroughKafkaAndClickHouse(t *testing.T) {
	cfg := testenv.Config(t, testenv.Kafka(t), testenv.ClickHouse(t))
	cfg.Sink.BatchInterval = 50 * time.Millisecond
	hr := func(v, at float64) smp { return smp{"heart_rate", v, at} }
	produce(t, cfg, []*vigilv1.SampleBatch{
		hrAt("p-late", t0, "m1", hr(70, 10), hr(80, 62)),
		hrAt("p-late", t0, "m2", hr(74, 30)),
		hrAt("p-late", t0, "m3", hr(90, 66)),
		hrAt("p-late", t0, "m4", hr(71, 40)),
		hrAt("p-late", t0, "m5", hr(100, 125)),
		hrAt("p-late", t0, "m6", hr(60, 20)),
	})
	log := testenv.Logger(t)
	if err := chsink.Migrate(context.Background(), cfg.ClickHouse, log); err != nil {
		t.Fatal(err)
	}
	sink, err := chsink.New(cfg, stage.Deps{Log: log, Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	sctx, scancel := context.WithCancel(context.Background())
	sdone := make(chan error, 1)
	go func() { sdone <- sink.Run(sctx) }()
	t.Cleanup(func() {
		scancel()
		<-sdone
		_ = sink.Close(context.Background())
	})

	r := start(t, cfg, "a")
	waitCaughtUp(t, cfg, 30*time.Second)
	r.stop(t)

	out := readOutputs(t, cfg)
	ones := only(out.fws, "1m")
	if len(ones) != 3 {
		t.Fatalf("1-minute windows on the topic: %v", ones)
	}
	v1, v2, m1 := ones[0], ones[1], ones[2]
	if f := feature(v1, "heart_rate"); v1.StartMs != t0 || v1.Version != 1 || f.Count != 2 || f.Mean != 72 || f.Std != 2 ||
		!approx(f.SlopePerMin, 12) || f.Median != 72 || f.Last != 74 || v1.WatermarkMs != t0+61000 {
		t.Errorf("first emission of [0, 60 s): %v", v1)
	}
	if f := feature(v2, "heart_rate"); v2.StartMs != t0 || v2.Version != 2 || f.Count != 3 || !approx(f.Mean, 215.0/3) ||
		f.Median != 71 || f.Last != 71 || f.LastTimeMs != t0+40000 || f.SinceLastMs != 20000 || f.Min != 70 || f.Max != 74 {
		t.Errorf("correction of [0, 60 s): %v", v2)
	}
	if f := feature(m1, "heart_rate"); m1.StartMs != t0+60000 || m1.Version != 1 || f.Count != 2 || f.Mean != 85 {
		t.Errorf("[60, 120 s): %v", m1)
	}
	// The 5-minute window ending at +60 s is corrected too.
	var fiveVersions []uint32
	for _, fw := range only(out.fws, "5m") {
		if fw.EndMs == t0+60000 {
			fiveVersions = append(fiveVersions, fw.Version)
		}
	}
	if !slices.Equal(fiveVersions, []uint32{1, 2}) {
		t.Errorf("5-minute window ending at +60 s: versions %v, want [1 2]", fiveVersions)
	}
	if len(out.dls) != 1 || out.dls[0].Reason != "too_late" || out.dls[0].MessageId != "m6" || out.dls[0].Batch.Samples[0].EventTimeMs != t0+20000 {
		t.Errorf("dead letters: %v", out.dls)
	}
	if got := counterValue(t, r.reg, "vigil_stream_late_samples_total", ""); got != 1 {
		t.Errorf("vigil_stream_late_samples_total = %v, want 1", got)
	}
	if got := counterValue(t, r.reg, "vigil_stream_dead_letters_total", "too_late"); got != 1 {
		t.Errorf("too_late dead letters metric = %v, want 1", got)
	}

	// ClickHouse keeps the latest version of the window.
	conn, err := chsink.Open(context.Background(), cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var n uint64
		if err := conn.QueryRow(context.Background(), `SELECT count() FROM features WHERE patient = 'p-late' AND window_name = '1m' AND metric = 'heart_rate'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d 1-minute heart-rate rows in ClickHouse, want 3 (two versions of [0, 60 s) and [60, 120 s))", n)
		}
		time.Sleep(100 * time.Millisecond)
	}
	var (
		version              uint32
		count                uint64
		mean, median, p25    float64
		sinceLast            int64
		derived              uint8
		windowName, kindName string
	)
	if err := conn.QueryRow(context.Background(), `SELECT version, count, mean, median, p25, since_last_ms, derived_metric, window_name, kind
		FROM features_final WHERE patient = 'p-late' AND metric = 'heart_rate' AND window_name = '1m' AND window_start_ms = ?`, t0).Scan(
		&version, &count, &mean, &median, &p25, &sinceLast, &derived, &windowName, &kindName); err != nil {
		t.Fatal(err)
	}
	// 70 71 74: p25 h = 0.5 -> 70.5.
	if version != 2 || count != 3 || !approx(mean, 215.0/3) || median != 71 || p25 != 70.5 || sinceLast != 20000 || derived != 0 ||
		windowName != "1m" || kindName != "tumbling" {
		t.Errorf("features_final [0, 60 s): version %d count %d mean %v median %v p25 %v since_last %d derived %d window %q kind %q",
			version, count, mean, median, p25, sinceLast, derived, windowName, kindName)
	}
}

// TestIdleTimeoutClosesSilentPatient: a patient sends two minutes' worth
// of nothing after HR 80 at +10 s and 90 at +20 s (watermark +15 s, every
// window open). With the processor's clock moved by the idle timeout its
// windows close: [0, 60 s) (mean 85, slope 60/min) and the five 5-minute
// windows holding minute 0, at watermark +300 s, with the window-end score
// at +60 s.
func TestIdleTimeoutClosesSilentPatient(t *testing.T) {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	clk := clock.NewManual(time.Now())
	produce(t, cfg, []*vigilv1.SampleBatch{
		hrAt("p-quiet", t0, "m1", smp{"heart_rate", 80, 10}, smp{"spo2", 97, 10}),
		hrAt("p-quiet", t0, "m2", smp{"heart_rate", 90, 20}),
	})
	r := startClocked(t, cfg, "a", clk)
	waitCaughtUp(t, cfg, 30*time.Second)
	// Caught up, and a few idle checks (every second at most) later
	// nothing has closed.
	time.Sleep(1500 * time.Millisecond)
	if recs := testenv.ReadAll(t, cfg.Kafka.Brokers[0], cfg.Kafka.Topics.Features); len(recs) != 0 {
		t.Fatalf("%d feature windows before the idle timeout", len(recs))
	}
	clk.Advance(cfg.Stream.Windows.IdleTimeout)
	fws := waitFeatures(t, cfg, 6, 15*time.Second)
	ones, fives := only(fws, "1m"), only(fws, "5m")
	if len(ones) != 1 || len(fives) != 5 || len(fws) != 6 {
		t.Fatalf("windows after the idle timeout: %v", fws)
	}
	if f := feature(ones[0], "heart_rate"); ones[0].StartMs != t0 || f.Count != 2 || f.Mean != 85 || !approx(f.SlopePerMin, 60) || f.Last != 90 {
		t.Errorf("minute 0: %v", ones[0])
	}
	for i, fw := range fives {
		if fw.EndMs != t0+int64(i+1)*60000 || fw.WatermarkMs != t0+300000 || feature(fw, "heart_rate").GetCount() != 2 {
			t.Errorf("5-minute window %d: %v", i, fw)
		}
	}
	scores := decode(t, testenv.ReadAll(t, cfg.Kafka.Brokers[0], cfg.Kafka.Topics.Scores), func() *vigilv1.Score { return &vigilv1.Score{} })
	var atEnd int
	for _, s := range onlyKind(scores, "news2") {
		if s.EventTimeMs == t0+60000 {
			atEnd++
		}
	}
	if atEnd != 1 {
		t.Errorf("window-end scores at +60 s: %d, want 1 (scores %v)", atEnd, scores)
	}
	r.cancel()
	if err := <-r.done; err != nil {
		t.Fatal(err)
	}
	if got := counterValue(t, r.reg, "vigil_stream_features_emitted_total", ""); got != 6 {
		t.Errorf("vigil_stream_features_emitted_total = %v, want 6", got)
	}
}

// lastYear is a minute boundary a year before t0.
var lastYear = time.Date(2025, 11, 23, 8, 0, 0, 0, time.UTC).UnixMilli()

// replayBatches is ten minutes of last year's data for three patients, as
// a replay feeds it: every 10 s each patient sends HR 60 + 10 p + m and
// SpO2 98 - (m mod 3), m the minute (0..9), p the patient (0..2).
func replayBatches() []*vigilv1.SampleBatch {
	var out []*vigilv1.SampleBatch
	for s := 0; s < 600; s += 10 {
		m := s / 60
		for p := range 3 {
			out = append(out, hrAt(fmt.Sprintf("p-%d", p), lastYear, fmt.Sprintf("r%d-%d", p, s),
				smp{"heart_rate", float64(60 + 10*p + m), float64(s)}, smp{"spo2", float64(98 - m%3), float64(s)}))
		}
	}
	return out
}

// runReplay replays last year's data through a processor on a broker of its
// own: event time closes the windows up to the last sample's watermark
// (+595 s), the idle timeout on the processor's clock the rest.
func runReplay(t *testing.T) topicOutputs {
	t.Helper()
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	clk := clock.NewManual(time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC))
	produce(t, cfg, replayBatches())
	r := startClocked(t, cfg, "replay", clk)
	waitCaughtUp(t, cfg, 60*time.Second)
	// Closed by event time: per patient minutes 0-8 and the 5-minute
	// windows ending at minutes 1-9.
	waitFeatures(t, cfg, 3*(9+9), 15*time.Second)
	clk.Advance(cfg.Stream.Windows.IdleTimeout)
	waitFeatures(t, cfg, 3*(10+14), 15*time.Second)
	r.cancel()
	if err := <-r.done; err != nil {
		t.Fatal(err)
	}
	return readOutputs(t, cfg)
}

// TestReplayLastYearClosesEveryWindow replays last year's data twice: every
// window of it closes (nothing waits for a wall clock to reach last year),
// with the values worked out by hand, and the two runs give identical
// output (processing times aside).
func TestReplayLastYearClosesEveryWindow(t *testing.T) {
	a := runReplay(t)
	type key struct {
		patient, window string
		start           int64
	}
	seen := map[key]*vigilv1.FeatureWindow{}
	for _, fw := range a.fws {
		k := key{fw.Patient, fw.Window, fw.StartMs}
		if seen[k] != nil || fw.Version != 1 {
			t.Errorf("window %v emitted twice or corrected: %v", k, fw)
		}
		seen[k] = fw
	}
	if len(seen) != 3*24 {
		t.Errorf("%d windows, want 72 (per patient 10 1-minute and 14 5-minute)", len(seen))
	}
	for p := range 3 {
		patient := fmt.Sprintf("p-%d", p)
		// 1-minute window m: six samples of HR 60+10p+m; SpO2 98-(m%3).
		for m := range 10 {
			fw := seen[key{patient, "1m", lastYear + int64(m)*60000}]
			hr, sp := feature(fw, "heart_rate"), feature(fw, "spo2")
			if hr == nil || sp == nil || hr.Count != 6 || hr.Mean != float64(60+10*p+m) || hr.Std != 0 ||
				sp.Mean != float64(98-m%3) || hr.Completeness != 0.1 {
				t.Errorf("%s minute %d: %v", patient, m, fw)
			}
		}
		// 5-minute window ending at minute e (1..14) holds minutes
		// max(0, e-5) .. min(9, e-1): e.g. p-0 ending at 3: minutes 0-2,
		// 18 samples, mean HR 61; ending at 12: minutes 7-9, mean 68.
		for e := 1; e <= 14; e++ {
			lo, hi := max(0, e-5), min(9, e-1)
			fw := seen[key{patient, "5m", lastYear + int64(e-5)*60000}]
			hr := feature(fw, "heart_rate")
			wantMean := float64(60+10*p) + float64(lo+hi)/2
			if hr == nil || hr.Count != uint64(6*(hi-lo+1)) || hr.Mean != wantMean || hr.Min != float64(60+10*p+lo) || hr.Max != float64(60+10*p+hi) {
				t.Errorf("%s 5-minute window ending at minute %d: %v, want count %d mean %v", patient, e, hr, 6*(hi-lo+1), wantMean)
			}
		}
	}
	if p0 := feature(seen[key{"p-0", "5m", lastYear - 2*60000}], "heart_rate"); p0 == nil || p0.Mean != 61 || p0.Count != 18 {
		t.Errorf("p-0 5-minute window ending at minute 3: %v", p0)
	}

	b := runReplay(t)
	wa, wb := normalized(t, a), normalized(t, b)
	if len(wa) == 0 {
		t.Fatal("no output")
	}
	for k, v := range wa {
		if !slices.Equal(v, wb[k]) {
			t.Errorf("%s: second replay gave %d records, first %d, or different ones", k, len(wb[k]), len(v))
		}
	}
	for k := range wb {
		if _, ok := wa[k]; !ok {
			t.Errorf("%s only in the second replay", k)
		}
	}
}

// TestFlushOnShutdownOnlyWhenConfigured: the scenario ends with minute 3
// open (HR 74 at +190 s, watermark +185 s). Stopped with
// flush_on_shutdown off, nothing more comes out; on, the stop closes
// [180 s, 240 s) and the five 5-minute windows holding minute 3 (ending
// +240 ... +480 s), at watermark +480 s.
func TestFlushOnShutdownOnlyWhenConfigured(t *testing.T) {
	for _, flush := range []bool{false, true} {
		cfg := testenv.Config(t, testenv.Kafka(t), "")
		cfg.Stream.Windows.IdleTimeout = 0
		cfg.Stream.Windows.FlushOnShutdown = flush
		produce(t, cfg, scenarioBatches("st-mary", "p-001"))
		r := start(t, cfg, "a")
		waitCaughtUp(t, cfg, 30*time.Second)
		r.stop(t)
		out := readOutputs(t, cfg)
		var late []*vigilv1.FeatureWindow
		for _, fw := range out.fws {
			if fw.EndMs > t0+180000 {
				late = append(late, fw)
			}
		}
		if !flush {
			checkScenario(t, out.fws, out.scores, out.alerts, out.dls)
			if len(late) != 0 {
				t.Errorf("flush off: windows closed at stop: %v", late)
			}
			continue
		}
		ones, fives := only(late, "1m"), only(late, "5m")
		if len(ones) != 1 || len(fives) != 5 || len(late) != 6 {
			t.Fatalf("flush on: windows closed at stop: %v", late)
		}
		if f := feature(ones[0], "heart_rate"); ones[0].StartMs != t0+180000 || f.Count != 1 || f.Last != 74 || ones[0].WatermarkMs != t0+480000 {
			t.Errorf("flush on: minute 3: %v", ones[0])
		}
		for i, fw := range fives {
			if fw.EndMs != t0+int64(240+60*i)*1000 {
				t.Errorf("flush on: 5-minute window %d ends at %d", i, fw.EndMs-t0)
			}
		}
		// Window-end score at +240 s.
		if s := out.scores[len(out.scores)-1]; s.EventTimeMs != t0+240000 {
			t.Errorf("flush on: last score at +%d ms, want the window-end score at +240 s", s.EventTimeMs-t0)
		}
	}
}
