package stream

import (
	"context"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/detectors/model"
	"github.com/vigilhealth/vigil/detectors/model/export"
	"github.com/vigilhealth/vigil/detectors/model/train"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

const testModelName = "deterioration-test"

// trainTestModel trains a logistic regression with the trainer on
// synthetic rows (high heart rate and low SpO2 mean positive), exports it
// as ONNX and saves it to a new registry. It returns the registry folder,
// the trainer's model and the saved manifest.
func trainTestModel(t testing.TB) (string, *train.Model, *model.Manifest) {
	t.Helper()
	r := rand.New(rand.NewPCG(11, 12))
	const n, f = 600, 4
	x := make([]float32, n*f)
	y := make([]float64, n)
	for i := 0; i < n; i++ {
		hr, spo2, stay, cnt := 55+80*r.Float64(), 84+16*r.Float64(), 10*r.Float64(), float64(r.IntN(50))
		x[i*f], x[i*f+1], x[i*f+2], x[i*f+3] = float32(hr), float32(spo2), float32(stay), float32(cnt)
		if (hr-95)/12-(spo2-93)/3+r.NormFloat64()*0.3 > 0 {
			y[i] = 1
		}
	}
	cfg := train.DefaultConfig()
	cfg.Algorithm, cfg.Workers = train.LogReg, 1
	tm, err := train.Fit(x, y, f, cfg)
	if err != nil {
		t.Fatal(err)
	}
	onnx, err := export.Marshal(tm, export.Options{})
	if err != nil {
		t.Fatal(err)
	}
	man := &model.Manifest{
		Name: testModelName, Version: "1", Created: time.Date(2026, 11, 23, 20, 0, 0, 0, time.UTC), Algorithm: "logreg",
		Description: "synthetic deterioration model for the stream tests",
		Inputs: []model.Input{
			{Name: "heart_rate_last", Source: "last:heart_rate", Unit: "/min", Fill: 80,
				Reference: model.Reference{Edges: []float64{70, 90, 110}, Proportions: []float64{0.2, 0.3, 0.3, 0.2}}},
			{Name: "spo2_last", Source: "last:spo2", Unit: "%", Fill: 97},
			{Name: "stay_hours", Source: "stay_h", Unit: "h", Fill: 0},
			{Name: "heart_rate_count", Source: "count:heart_rate", Unit: "1", Fill: 0},
		},
		InputName: export.DefaultIn, Output: model.Output{Name: export.DefaultOut, Index: 1}, Threshold: 0.5,
		Training: model.Training{Data: "synthetic", Rows: n, Seed: 11},
	}
	dir := t.TempDir()
	if _, err := model.Save(dir, man, onnx); err != nil {
		t.Fatal(err)
	}
	return dir, tm, man
}

func withModel(cfg config.Config, t testing.TB, registry string) config.Config {
	cfg.Detectors.Models.Registry = registry
	cfg.Detectors.Models.ONNXRuntimeLibrary = testenv.ONNXRuntime(t)
	cfg.Detectors.Models.Run = []config.ModelRef{{Name: testModelName, Version: "latest"}}
	return cfg
}

// modelBatches: a deteriorating patient (fast heart rate, low SpO2) and a
// well one over three minutes.
func modelBatches() []*vigilv1.SampleBatch {
	hr := func(v, at float64) smp { return smp{"heart_rate", v, at} }
	spo2 := func(v, at float64) smp { return smp{"spo2", v, at} }
	return []*vigilv1.SampleBatch{
		hrAt("p-sick", t0, "s1", hr(128, 5), spo2(88, 5)),
		hrAt("p-well", t0, "w1", hr(72, 6), spo2(98, 6)),
		hrAt("p-sick", t0, "s2", hr(131, 40)),
		hrAt("p-well", t0, "w2", hr(72, 41)), // same observed inputs: no change score
		hrAt("p-sick", t0, "s3", hr(134, 70), spo2(87, 70)),
		hrAt("p-well", t0, "w3", hr(75, 71)),
		hrAt("p-sick", t0, "s4", hr(136, 130)),
		hrAt("p-well", t0, "w4", hr(74, 131)),
	}
}

// TestModelScoresThroughKafkaAndClickHouse is the must-show: a model
// trained with the trainer, exported to ONNX and saved in a registry runs
// in the stream engine (ONNX Runtime from the npm library), its scores go
// to the scores topic with the trainer's probabilities, and the score rows
// in ClickHouse name the model's version and sha256.
func TestModelScoresThroughKafkaAndClickHouse(t *testing.T) {
	registry, tm, man := trainTestModel(t)
	cfg := withModel(testenv.Config(t, testenv.Kafka(t), testenv.ClickHouse(t)), t, registry)
	cfg.Sink.BatchInterval = 50 * time.Millisecond
	// A site rule over the model that takes its threshold from the
	// manifest (`raise: manifest`).
	rules := filepath.Join(t.TempDir(), "rules.yaml")
	if err := os.WriteFile(rules, []byte("name: site-rules\nversion: '1'\nrules:\n"+
		"  - {name: sepsis_model, score: \"model:"+testModelName+"\", raise: manifest, severity: high}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg.Alerts.Lifecycle.Rules = rules
	produce(t, cfg, modelBatches())
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

	r := start(t, cfg, "m") // no runtime passed: the processor makes and owns one
	waitCaughtUp(t, cfg, 60*time.Second)
	if got := histogramCount(t, r.reg, "vigil_model_inference_seconds"); got == 0 {
		t.Error("no model inference observed")
	}
	r.stop(t)

	kind := "model:" + testModelName
	byPatient := map[string][]*vigilv1.Score{}
	for _, s := range readOutputs(t, cfg).scores {
		if s.Kind == kind {
			byPatient[s.Patient] = append(byPatient[s.Patient], s)
		}
	}
	sick, well := byPatient["p-sick"], byPatient["p-well"]
	if len(sick) == 0 || len(well) == 0 {
		t.Fatalf("model scores: sick %v, well %v", sick, well)
	}
	// The model rule raised for p-sick (above the manifest threshold) and
	// not for p-well, naming the model's version and hash.
	raisedFor := map[string]*vigilv1.AlertEvent{}
	for _, a := range readOutputs(t, cfg).alerts {
		if a.Rule == "sepsis_model" && a.Type == vigilv1.AlertEventType_ALERT_EVENT_RAISED {
			raisedFor[a.Patient] = a
		}
	}
	if a := raisedFor["p-sick"]; a == nil || a.GetScore().GetRulesetHash() != man.SHA256 || a.GetScore().GetValue() < man.Threshold {
		t.Errorf("model alert for p-sick: %v (threshold %v, hash %s)", a, man.Threshold, man.SHA256)
	}
	if a := raisedFor["p-well"]; a != nil {
		t.Errorf("model alert for p-well, whose score stays below the threshold: %v", a)
	}
	// The first change score of p-sick: HR 128, SpO2 88, stay 0 h, 1 heart rate.
	first := sick[0]
	want := tm.Predict([]float32{128, 88, 0, 1})
	if first.EventTimeMs != t0+5000 || math.Abs(first.Value-want) > 1e-5 || first.Band != "high" ||
		first.Ruleset != testModelName || first.RulesetVersion != "1" || first.RulesetHash != man.SHA256 {
		t.Errorf("first p-sick model score %v, want value %v (trainer), band high, version 1, hash %s", first, want, man.SHA256)
	}
	if c := first.Components; len(c) != 4 || c[0].Parameter != "heart_rate_last" || c[0].InputValue != 128 || c[0].InputTimeMs != t0+5000 || c[0].Missing {
		t.Errorf("components %v", first.Components)
	}
	if len(first.TopContributors) == 0 || first.TopContributors[0] != "heart_rate_last" {
		t.Errorf("top contributors %v", first.TopContributors)
	}
	if w := well[0]; w.Band != "low" || math.Abs(w.Value-tm.Predict([]float32{72, 98, 0, 1})) > 1e-5 {
		t.Errorf("first p-well model score %v", w)
	}
	// A window-end score at +60 s from the closed window's values: HR 131
	// (+40 s), SpO2 88 (+5 s), stay 55 s.
	var end *vigilv1.Score
	for _, s := range sick {
		if s.EventTimeMs == t0+60000 {
			end = s
		}
	}
	if end == nil || end.Components[0].InputValue != 131 || end.Components[1].InputValue != 88 || math.Abs(end.Components[2].InputValue-55.0/3600) > 1e-12 {
		t.Fatalf("p-sick window-end model score at +60 s: %v", end)
	}
	// p-well's second batch repeats its inputs: no change score at +41 s.
	for _, s := range well {
		if s.EventTimeMs == t0+41000 {
			t.Errorf("p-well change score with unchanged inputs: %v", s)
		}
	}

	conn, err := chsink.Open(context.Background(), cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var n uint64
		if err := conn.QueryRow(context.Background(), `SELECT count() FROM scores WHERE kind = ? AND patient = 'p-sick' AND ruleset_version = '1' AND ruleset_hash = ?`,
			kind, man.SHA256).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if int(n) == len(sick) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d model score rows for p-sick in ClickHouse naming version 1 and hash %s, want %d", n, man.SHA256, len(sick))
		}
		time.Sleep(100 * time.Millisecond)
	}
	var (
		value   float64
		band    string
		ruleset string
	)
	if err := conn.QueryRow(context.Background(), `SELECT value, band, ruleset FROM scores WHERE kind = ? AND patient = 'p-sick' AND event_time_ms = ?`,
		kind, t0+5000).Scan(&value, &band, &ruleset); err != nil {
		t.Fatal(err)
	}
	if math.Abs(value-want) > 1e-5 || band != "high" || ruleset != testModelName {
		t.Errorf("ClickHouse row: value %v band %s ruleset %s; want %v high %s", value, band, ruleset, want, testModelName)
	}
}

func histogramCount(t testing.TB, reg *prometheus.Registry, name string) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				n += m.GetHistogram().GetSampleCount()
			}
		}
	}
	return n
}

// modelEngine is testEngine with the test model configured on rt.
func modelEngine(t testing.TB, rt *model.Runtime, registry string) *engine {
	t.Helper()
	e := testEngine(t)
	cfg := withModel(config.Default(), t, registry)
	ms, err := openModels(cfg, rt, catalog.Default(), stage.Deps{Log: testenv.Logger(t), Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ms.close() })
	e.models = ms
	return e
}

// TestEngineModelRestoreIsExact: with a model configured, restoring the
// patients from their changelog encoding after every batch (first-sample
// time, counts, change digest, boundary times) gives exactly the scores of
// the uninterrupted run; and an engine without models emits the same
// non-model outputs.
func TestEngineModelRestoreIsExact(t *testing.T) {
	registry, _, _ := trainTestModel(t)
	rt, err := model.NewRuntime(model.RuntimeOptions{LibraryPath: testenv.ONNXRuntime(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	run := func(e *engine, roundTrip bool) []*vigilv1.Score {
		var scores []*vigilv1.Score
		pats := map[string]*patient{}
		var out outputs
		defer out.release()
		for i, b := range modelBatches() {
			key := b.Tenant + "/" + b.Patient
			p := pats[key]
			if p == nil {
				p = e.newPatient(key, b.Tenant, b.Patient)
			}
			out.reset()
			e.apply(p, b, int64(1000+i), &out)
			for _, o := range out.list {
				if o.kind == outScore {
					scores = append(scores, o.score)
				}
			}
			if roundTrip {
				raw, err := encode(p.toProto())
				if err != nil {
					t.Fatal(err)
				}
				var ps vigilv1.PatientState
				if err := proto.Unmarshal(raw, &ps); err != nil {
					t.Fatal(err)
				}
				if p, err = e.fromProto(key, &ps); err != nil {
					t.Fatal(err)
				}
			}
			pats[key] = p
		}
		return scores
	}
	e := modelEngine(t, rt, registry)
	a, b := run(e, false), run(e, true)
	if len(a) != len(b) {
		t.Fatalf("%d scores uninterrupted, %d with restores", len(a), len(b))
	}
	nModel := 0
	for i := range a {
		if !proto.Equal(a[i], b[i]) {
			t.Errorf("score %d differs after restore:\n%v\n%v", i, a[i], b[i])
		}
		if a[i].Kind == "model:"+testModelName {
			nModel++
		}
	}
	plain := run(testEngine(t), false)
	if nModel == 0 || len(plain) != len(a)-nModel {
		t.Fatalf("%d model scores; %d scores without models, %d with", nModel, len(plain), len(a))
	}
}
