package stream

import (
	"math"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/detectors/alerting"
	"github.com/vigilhealth/vigil/detectors/news2"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/config"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func testEngine() *engine {
	c := config.Default().Stream
	return &engine{
		sizeMs: c.Window.Milliseconds(), oooMs: c.OutOfOrderness.Milliseconds(), staleness: c.Staleness,
		ruleset: news2.Default(), alerts: alerting.New(alerting.NEWS2Rules()), catalog: catalog.Default(),
	}
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
	e := testEngine()
	var c collected
	var p *patient
	for i, b := range batches {
		if p == nil {
			p = e.newPatient("st-mary/p-001", b.Tenant, b.Patient)
		}
		var out outputs
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

func TestEngineLateAndInvalid(t *testing.T) {
	e := testEngine()
	p := e.newPatient("t/p", "t", "p")
	var out outputs
	// The first batch of a patient is never late, however old.
	e.apply(p, &vigilv1.SampleBatch{Tenant: "t", Patient: "p", Samples: []*vigilv1.Sample{
		{Metric: "heart_rate", Value: 70, EventTimeMs: t0 + 120000},
		{Metric: "heart_rate", Value: 71, EventTimeMs: t0 + 3000}, // same batch: windows open with the batch's watermark before it
	}}, 1, &out)
	if len(out.list) == 0 || out.late != 0 {
		t.Fatalf("first batch: %d outputs, %d late", len(out.list), out.late)
	}
	out.reset()
	// Window [t0, t0+60s) closed above (watermark t0+115 s): t0+59.999 s is late,
	// t0+60 s (next window, end t0+120 s > watermark) is not.
	changed := e.apply(p, &vigilv1.SampleBatch{Tenant: "t", Patient: "p", Samples: []*vigilv1.Sample{
		{Metric: "heart_rate", Value: 72, EventTimeMs: t0 + 59999},
		{Metric: "", Value: 1, EventTimeMs: t0 + 130000},
		{Metric: "heart_rate", Value: 73, EventTimeMs: t0 + 60000},
		{Metric: "spo2", Value: math.NaN(), EventTimeMs: t0 + 130000},
		{Metric: "made_up", Value: 1, EventTimeMs: t0 + 130000},
	}}, 2, &out)
	if !changed || out.late != 1 || out.invalid != 3 || out.samples != 5 {
		t.Fatalf("changed %v late %d invalid %d samples %d", changed, out.late, out.invalid, out.samples)
	}
	reasons := map[string]string{}
	for _, o := range out.list {
		if o.kind == outDeadLetter {
			reasons[o.dl.Reason] = o.dl.Field
		}
	}
	if reasons["too_late"] != "samples[0]" || reasons["unknown_metric"] != "samples[1],samples[4]" || reasons["out_of_range"] != "samples[3]" {
		t.Errorf("dead letters %v", reasons)
	}
	out.reset()
	if e.apply(p, &vigilv1.SampleBatch{Tenant: "t", Patient: "p", Samples: []*vigilv1.Sample{
		{Metric: "heart_rate", Value: 72, EventTimeMs: t0},
	}}, 3, &out) {
		t.Error("a batch of only late samples changed the state")
	}
}

func TestEngineNoScoreWithoutNEWS2Inputs(t *testing.T) {
	e := testEngine()
	p := e.newPatient("t/p", "t", "p")
	var out outputs
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
	if fws != 1 || scores != 0 {
		t.Errorf("steps only: %d feature windows, %d scores; want 1, 0", fws, scores)
	}
}

// BenchmarkEngine measures the per-patient processing alone.
func BenchmarkEngine(b *testing.B) {
	e := testEngine()
	p := e.newPatient("t/p", "t", "p")
	var out outputs
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
