package stream

import (
	"math"
	"testing"

	"github.com/apache/arrow/go/v17/arrow/memory"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/detectors/ews"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/config"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// testEngine is the engine of the default configuration, allocating its
// Arrow batches from a checked allocator that must be back to zero when
// the test ends (every outputs passed to it released by then).
func testEngine(t testing.TB) *engine {
	t.Helper()
	mem := memory.NewCheckedAllocator(memory.NewGoAllocator())
	t.Cleanup(func() { mem.AssertSize(t, 0) })
	e, err := newEngine(config.Default(), ews.Default(), catalog.Default(), mem)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

type collected struct {
	fws    []*vigilv1.FeatureWindow
	scores []*vigilv1.Score
	alerts []*vigilv1.AlertEvent
	dls    []*vigilv1.DeadLetter
}

func (c *collected) add(o outputs) {
	for _, x := range o.list {
		switch x.kind {
		case outFeatures:
			c.fws = append(c.fws, x.fw)
		case outScore:
			c.scores = append(c.scores, x.score)
		case outAlert:
			c.alerts = append(c.alerts, x.alert)
		case outDeadLetter:
			c.dls = append(c.dls, x.dl)
		}
	}
}

// runEngine runs the batches through the engine; with roundTrip, the
// patient's state goes through its changelog encoding between batches, as
// after a restart.
func runEngine(t *testing.T, batches []*vigilv1.SampleBatch, roundTrip bool) collected {
	t.Helper()
	e := testEngine(t)
	var c collected
	var p *patient
	var out outputs
	defer out.release()
	for i, b := range batches {
		if p == nil {
			p = e.newPatient("st-mary/p-001", b.Tenant, b.Patient)
		}
		out.reset()
		e.apply(p, b, int64(1000+i), &out)
		c.add(out)
		if roundTrip {
			raw, err := encode(p.toProto())
			if err != nil {
				t.Fatal(err)
			}
			var ps vigilv1.PatientState
			if err := proto.Unmarshal(raw, &ps); err != nil {
				t.Fatal(err)
			}
			if p, err = e.fromProto(p.key, &ps); err != nil {
				t.Fatal(err)
			}
		}
	}
	return c
}

func TestEngineScenario(t *testing.T) {
	c := runEngine(t, scenarioBatches("st-mary", "p-001"), false)
	checkScenario(t, c.fws, c.scores, c.alerts, c.dls)
}

// TestEngineRestoreIsExact: state restored from its changelog encoding
// after every batch gives exactly the outputs of the uninterrupted run.
func TestEngineRestoreIsExact(t *testing.T) {
	batches := scenarioBatches("st-mary", "p-001")
	a, b := runEngine(t, batches, false), runEngine(t, batches, true)
	checkScenario(t, b.fws, b.scores, b.alerts, b.dls)
	eq := func(name string, x, y []proto.Message) {
		if len(x) != len(y) {
			t.Fatalf("%s: %d vs %d", name, len(x), len(y))
		}
		for i := range x {
			if !proto.Equal(x[i], y[i]) {
				t.Errorf("%s %d differs after restore:\n%v\n%v", name, i, x[i], y[i])
			}
		}
	}
	eq("features", msgs(a.fws), msgs(b.fws))
	eq("scores", msgs(a.scores), msgs(b.scores))
	eq("alerts", msgs(a.alerts), msgs(b.alerts))
	eq("dead letters", msgs(a.dls), msgs(b.dls))
}

func msgs[T proto.Message](xs []T) []proto.Message {
	out := make([]proto.Message, len(xs))
	for i, x := range xs {
		out[i] = x
	}
	return out
}

// byKind splits outputs.
func byKind(out *outputs) collected {
	var c collected
	c.add(*out)
	return c
}

func hrBatch(ms ...int64) *vigilv1.SampleBatch {
	b := &vigilv1.SampleBatch{Tenant: "t", Patient: "p", Source: vigilv1.Source_SOURCE_HTTP}
	for i, at := range ms {
		b.Samples = append(b.Samples, &vigilv1.Sample{Metric: "heart_rate", Value: float64(70 + i), EventTimeMs: t0 + at})
	}
	return b
}

// TestEngineLateAndInvalid: default settings (5 s out-of-orderness, 60 s
// allowed lateness).
func TestEngineLateAndInvalid(t *testing.T) {
	e := testEngine(t)
	p := e.newPatient("t/p", "t", "p")
	var out outputs
	defer out.release()
	// The first batch of a patient is never late, however old. HR 70 at
	// +120 s and 71 at +3 s: watermark +115 s closes [0, 60 s) (HR 71
	// alone) and the 5-minute window ending at +60 s.
	e.apply(p, hrBatch(120000, 3000), 1, &out)
	c := byKind(&out)
	if out.late != 0 || len(c.fws) != 2 || c.fws[0].Window != "1m" || c.fws[0].Version != 1 || feature(c.fws[0], "heart_rate").Mean != 71 {
		t.Fatalf("first batch: %d late, windows %v", out.late, c.fws)
	}
	out.reset()
	// HR 70 at +59.999 s: [0, 60 s) closed at +60 s, the watermark (+115 s)
	// is within 60 s of that: both windows come again as version 2, with
	// HR 71 and 70 (mean 70.5, last 70 at +59.999 s). HR 71 at +60 s goes
	// in the open minute.
	changed := e.apply(p, &vigilv1.SampleBatch{Tenant: "t", Patient: "p", Samples: []*vigilv1.Sample{
		{Metric: "heart_rate", Value: 70, EventTimeMs: t0 + 59999},
		{Metric: "", Value: 1, EventTimeMs: t0 + 130000},
		{Metric: "heart_rate", Value: 71, EventTimeMs: t0 + 60000},
		{Metric: "spo2", Value: math.NaN(), EventTimeMs: t0 + 130000},
		{Metric: "made_up", Value: 1, EventTimeMs: t0 + 130000},
		{Metric: "heart_rate", Value: 3e9, EventTimeMs: t0 + 130000}, // beyond the int32 keys at 1 /min
	}}, 2, &out)
	c = byKind(&out)
	if !changed || out.late != 0 || out.invalid != 4 || out.samples != 6 || out.corrections != 2 {
		t.Fatalf("changed %v late %d invalid %d samples %d corrections %d", changed, out.late, out.invalid, out.samples, out.corrections)
	}
	if len(c.fws) != 2 || c.fws[0].Version != 2 || c.fws[1].Version != 2 || c.fws[0].StartMs != t0 || c.fws[1].EndMs != t0+60000 {
		t.Fatalf("corrections %v", c.fws)
	}
	if hr := feature(c.fws[0], "heart_rate"); hr.Count != 2 || hr.Mean != 70.5 || hr.Last != 70 || hr.LastTimeMs != t0+59999 {
		t.Errorf("corrected minute: %v", hr)
	}
	reasons := map[string]string{}
	for _, d := range c.dls {
		reasons[d.Reason] = d.Field
	}
	if reasons["unknown_metric"] != "samples[1],samples[4]" || reasons["out_of_range"] != "samples[3],samples[5]" || len(reasons) != 2 {
		t.Errorf("dead letters %v", reasons)
	}
	// A window-end score is not taken again for a correction.
	if len(c.scores) != 0 {
		t.Errorf("scores for a correction: %v", c.scores)
	}
	out.reset()
	// HR at +181 s: watermark +176 s is 60 s or more past +60 s, the end
	// of [0, 60 s): a sample at +30 s is too late; one at +121 s (minute 2,
	// closed at +180 s... not yet: open) goes in.
	e.apply(p, hrBatch(181000), 3, &out)
	out.reset()
	changed = e.apply(p, hrBatch(30000, 121000), 4, &out)
	c = byKind(&out)
	if !changed || out.late != 1 || len(c.dls) != 1 || c.dls[0].Reason != "too_late" || c.dls[0].Field != "samples[0]" ||
		c.dls[0].Batch.Samples[0].EventTimeMs != t0+30000 || len(c.fws) != 0 {
		t.Fatalf("too late: changed %v late %d dead letters %v windows %v", changed, out.late, c.dls, c.fws)
	}
	out.reset()
	if e.apply(p, hrBatch(0), 5, &out) {
		t.Error("a batch of only too-late samples changed the state")
	}
}

// TestEngineIdleTimeout: a patient silent for the idle timeout (2 min by
// default, on the processing time the processor passes) has its open
// windows closed, with the window-end score, and later its state goes.
func TestEngineIdleTimeout(t *testing.T) {
	e := testEngine(t)
	p := e.newPatient("t/p", "t", "p")
	var out outputs
	defer out.release()
	// Seen at processing time 10 s: HR 80 at +10 s, 90 at +20 s; SpO2 97.
	b := hrBatch(10000, 20000)
	b.Samples[0].Value, b.Samples[1].Value = 80, 90
	b.Samples = append(b.Samples, &vigilv1.Sample{Metric: "spo2", Value: 97, EventTimeMs: t0 + 20000})
	const seen = 10000
	e.apply(p, b, seen, &out)
	if c := byKind(&out); len(c.fws) != 0 {
		t.Fatalf("windows closed at once: %v", c.fws)
	}
	out.reset()
	idle := config.Default().Stream.Windows.IdleTimeout.Milliseconds()
	if e.idle(p, seen+idle-1, &out) || len(out.list) != 0 {
		t.Fatalf("closed before the idle timeout: %v", out.list)
	}
	if !e.idle(p, seen+idle, &out) {
		t.Fatal("idle timeout did not change the patient")
	}
	c := byKind(&out)
	// Closed: [0, 60 s) and the five 5-minute windows holding minute 0
	// (ending +60 s ... +300 s); watermark at +300 s, the end of the last.
	var ones, fives int
	for _, fw := range c.fws {
		switch {
		case fw.Window == "1m" && fw.StartMs == t0:
			ones++
			if hr := feature(fw, "heart_rate"); hr.Count != 2 || hr.Mean != 85 || hr.Last != 90 || !approx(hr.SlopePerMin, 60) {
				t.Errorf("minute 0 heart rate %v", hr)
			}
		case fw.Window == "5m":
			fives++
		default:
			t.Errorf("unexpected window %v", fw)
		}
		if fw.WatermarkMs != t0+300000 || fw.EmittedTimeMs != seen+idle {
			t.Errorf("window %s at %d: watermark %d emitted %d", fw.Window, fw.StartMs, fw.WatermarkMs, fw.EmittedTimeMs)
		}
	}
	if ones != 1 || fives != 5 {
		t.Errorf("%d 1-minute and %d 5-minute windows, want 1 and 5", ones, fives)
	}
	// The window-end score at +60 s (HR 90 -> 1 point, SpO2 97 -> 0; the
	// other parameters missing). The change score at +20 s came first.
	// (MEWS scores the heart rate too; qSOFA has none of its inputs.)
	if news2 := onlyKind(c.scores, "news2"); len(news2) != 1 || news2[0].EventTimeMs != t0+60000 ||
		len(onlyKind(c.scores, "mews")) != 1 || len(onlyKind(c.scores, "qsofa")) != 0 {
		t.Errorf("window-end scores %v", c.scores)
	}
	out.reset()
	// Nothing left to close: no change until the panes kept for late
	// samples expire (allowed lateness after the last 5-minute window,
	// counted on from the timeout).
	if e.idle(p, seen+idle+1000, &out) || len(out.list) != 0 {
		t.Errorf("a second idle look changed the patient: %v", out.list)
	}
	// Panes go when newest event time (+20 s) - 5 s + overdue reaches the
	// pane start + 5 min + 60 s = +360 s: overdue 345 s.
	if !e.idle(p, seen+idle+345000, &out) || !p.win.Empty() || len(out.list) != 0 {
		t.Errorf("window state not dropped: empty %v, outputs %v", p.win.Empty(), out.list)
	}
	// A sample for minute 0 is now too late, one for minute 6 is not.
	out.reset()
	e.apply(p, hrBatch(30000, 370000), seen+idle+346000, &out)
	if out.late != 1 {
		t.Errorf("after idle: %d late, want 1", out.late)
	}
}

func TestEngineNoScoreWithoutNEWS2Inputs(t *testing.T) {
	e := testEngine(t)
	p := e.newPatient("t/p", "t", "p")
	var out outputs
	defer out.release()
	for i := range 3 {
		e.apply(p, &vigilv1.SampleBatch{Tenant: "t", Patient: "p", Samples: []*vigilv1.Sample{
			{Metric: "steps", Value: 10, EventTimeMs: t0 + int64(i)*60000},
		}}, 1, &out)
	}
	var fws, scores int
	for _, o := range out.list {
		switch o.kind {
		case outFeatures:
			fws++
		case outScore:
			scores++
		}
	}
	// Minute 0 (the 5m windows have no steps; the session, 10-minute
	// gap, is open).
	if fws != 1 || scores != 0 {
		t.Errorf("steps only: %d feature windows, %d scores; want 1, 0", fws, scores)
	}
}

// BenchmarkEngine measures the per-patient processing alone.
func BenchmarkEngine(b *testing.B) {
	e := testEngine(b)
	p := e.newPatient("t/p", "t", "p")
	var out outputs
	defer out.release()
	batch := &vigilv1.SampleBatch{Tenant: "t", Patient: "p", Samples: make([]*vigilv1.Sample, 6)}
	metrics := []string{"heart_rate", "spo2", "respiratory_rate", "systolic_bp", "body_temperature", "consciousness"}
	vals := []float64{80, 97, 16, 120, 37, 0}
	for i := range batch.Samples {
		batch.Samples[i] = &vigilv1.Sample{Metric: metrics[i], Value: vals[i]}
	}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		for _, s := range batch.Samples {
			s.EventTimeMs = t0 + int64(i)*1000
		}
		e.apply(p, batch, 0, &out)
		out.reset()
	}
	b.ReportMetric(float64(b.N*6)/b.Elapsed().Seconds(), "samples/s")
}
