package stream

import (
	"math"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/detectors/alerting"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
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
//	  closed) and HR 76. +190 HR 74 closes minute 2: window-end score 0 at
//	  +180 s; no change score.
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
	// Features: minutes 0, 1 and 2 closed; minute 3 still open.
	if len(fws) != 3 {
		t.Fatalf("%d feature windows, want 3", len(fws))
	}
	for i, fw := range fws {
		if fw.StartMs != t0+int64(i)*60000 || fw.EndMs != fw.StartMs+60000 || fw.SizeMs != 60000 || fw.Version != 1 ||
			fw.Kind != vigilv1.WindowKind_WINDOW_KIND_TUMBLING || fw.Patient != "p-001" || fw.Tenant != "st-mary" {
			t.Errorf("window %d header: %v", i, fw)
		}
	}
	if got := len(fws[0].Features); got != 6 {
		t.Errorf("minute 0 has %d metrics, want 6", got)
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

	// Scores: the published chart for each state of the vitals.
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
