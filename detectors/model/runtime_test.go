package model_test

import (
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/apache/arrow/go/v17/arrow/array"
	"github.com/apache/arrow/go/v17/arrow/memory"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vigilhealth/vigil/detectors/model"
	"github.com/vigilhealth/vigil/detectors/model/export"
	"github.com/vigilhealth/vigil/detectors/model/train"
	"github.com/vigilhealth/vigil/internal/testenv"
)

// testManifest describes a 3-input model over heart rate, SpO2 and stay.
func testManifest(name, version string) *model.Manifest {
	return &model.Manifest{
		Name: name, Version: version, Created: time.Date(2026, 11, 23, 20, 0, 0, 0, time.UTC), Algorithm: "logreg",
		Inputs: []model.Input{
			{Name: "heart_rate_last", Source: "last:heart_rate", Unit: "/min", Fill: 80,
				Reference: model.Reference{Edges: []float64{60, 70, 80, 90, 100, 110}, Proportions: []float64{0.05, 0.15, 0.3, 0.3, 0.1, 0.05, 0.05}}},
			{Name: "spo2_last", Source: "last:spo2", Unit: "%", Fill: 97},
			{Name: "stay", Source: "stay_h", Unit: "h", Fill: 0},
		},
		InputName: export.DefaultIn, Output: model.Output{Name: export.DefaultOut, Index: 1},
		Threshold: 0.5, Training: model.Training{Data: "synthetic", Rows: 400, Seed: 3},
	}
}

// trainSynthetic trains a model on rows where a high heart rate and low
// SpO2 mean positive, and returns it with its ONNX bytes.
func trainSynthetic(t *testing.T, algorithm string) (*train.Model, []byte, []float32) {
	t.Helper()
	r := rand.New(rand.NewPCG(3, 4))
	const n, f = 400, 3
	x := make([]float32, n*f)
	y := make([]float64, n)
	for i := 0; i < n; i++ {
		hr, spo2, stay := 60+60*r.Float64(), 85+15*r.Float64(), 48*r.Float64()
		x[i*f], x[i*f+1], x[i*f+2] = float32(hr), float32(spo2), float32(stay)
		if (hr-90)/15-(spo2-93)/3+r.NormFloat64()*0.5 > 0 {
			y[i] = 1
		}
	}
	cfg := train.DefaultConfig()
	cfg.Algorithm, cfg.Trees, cfg.Workers = algorithm, 50, 1
	cfg.MinChildWeight, cfg.L2, cfg.LearningRate = 1, 1, 0.1 // 400 rows: the sepsis defaults would barely split
	m, err := train.Fit(x, y, f, cfg)
	if err != nil {
		t.Fatal(err)
	}
	onnx, err := export.Marshal(m, export.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return m, onnx, x
}

func TestRuntimeRunsExportedModels(t *testing.T) {
	rt, err := model.NewRuntime(model.RuntimeOptions{LibraryPath: testenv.ONNXRuntime(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	if _, err := model.NewRuntime(model.RuntimeOptions{LibraryPath: testenv.ONNXRuntime(t)}); err == nil || !strings.Contains(err.Error(), "one model.Runtime per process") {
		t.Fatalf("second runtime: %v", err)
	}
	reg := prometheus.NewRegistry()
	met, err := model.NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, alg := range []string{train.LogReg, train.GBT} {
		t.Run(alg, func(t *testing.T) {
			tm, onnx, x := trainSynthetic(t, alg)
			man := testManifest("synth-"+alg, "1")
			man.Algorithm = alg
			dir := t.TempDir()
			if _, err := model.Save(dir, man, onnx); err != nil {
				t.Fatal(err)
			}
			lm, lonnx, err := model.OpenRegistry(dir, nil).Load(man.Name, "latest")
			if err != nil {
				t.Fatal(err)
			}
			md, err := rt.Open(lm, lonnx, met, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer md.Close()
			// One Arrow record of every row, one run; equal to the trainer within 1e-5.
			n := len(x) / 3
			rb := array.NewRecordBuilder(memory.NewGoAllocator(), md.Schema())
			for j := 0; j < 3; j++ {
				for i := 0; i < n; i++ {
					rb.Field(j).(*array.Float32Builder).Append(x[i*3+j])
				}
			}
			rec := rb.NewRecord()
			defer rec.Release()
			got, err := md.Infer(rec)
			if err != nil {
				t.Fatal(err)
			}
			want := tm.PredictBatch(x, nil)
			if len(got) != n {
				t.Fatalf("%d outputs for %d rows", len(got), n)
			}
			worst, high := 0.0, 0
			for i := range got {
				worst = max(worst, math.Abs(got[i]-want[i]))
				if got[i] >= 0.5 {
					high++
				}
			}
			if worst > 1e-5 {
				t.Fatalf("ONNX Runtime differs from the trainer by %g", worst)
			}
			if high == 0 || high == n {
				t.Fatalf("model predicts one class only (%d of %d high)", high, n)
			}
			if c := histCount(t, reg, "vigil_model_inference_seconds", man.Name); c != 1 {
				t.Fatalf("inference latency observations = %v, want 1", c)
			}
			checkScores(t, md, reg, tm)
		})
	}
}

// histCount returns the sample count of a model's histogram.
func histCount(t *testing.T, reg *prometheus.Registry, name, modelName string) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "model" && l.GetValue() == modelName {
					return m.GetHistogram().GetSampleCount()
				}
			}
		}
	}
	return 0
}

// src is a model.Source over fixed values.
type src struct {
	hr, spo2     float64
	hrMs, spo2Ms int64
	first        int64
}

func (s *src) Latest(m string) (float64, int64, bool) {
	switch m {
	case "heart_rate":
		return s.hr, s.hrMs, s.hrMs > 0
	case "spo2":
		return s.spo2, s.spo2Ms, s.spo2Ms > 0
	}
	return 0, 0, false
}
func (s *src) FirstSampleMs() int64 { return s.first }
func (s *src) Count(string) int     { return 0 }

// checkScores scores patients through a Batch and checks what a reader of
// the score sees, then shifts the heart-rate distribution and checks the
// drift gauge.
func checkScores(t *testing.T, md *model.Model, reg *prometheus.Registry, tm *train.Model) {
	man := md.Manifest()
	const at = int64(1_800_000_000_000)
	b := md.NewBatch()
	b.Add("t1", "sick", at, &src{hr: 135, spo2: 86, hrMs: at - 60_000, spo2Ms: at - 120_000, first: at - 5*3_600_000})
	b.Add("t1", "well", at, &src{hr: 72, spo2: 98, hrMs: at - 60_000, spo2Ms: at - 60_000, first: at - 3_600_000})
	b.Add("t1", "new", at, &src{})
	scores, err := md.Score(b, at+5)
	if err != nil {
		t.Fatal(err)
	}
	if len(scores) != 3 {
		t.Fatalf("%d scores", len(scores))
	}
	sick, well, empty := scores[0], scores[1], scores[2]
	if want := tm.Predict([]float32{135, 86, 5}); math.Abs(sick.GetValue()-want) > 1e-5 {
		t.Fatalf("sick P = %v, trainer %v", sick.GetValue(), want)
	}
	if sick.GetBand() != "high" || well.GetBand() != "low" {
		t.Fatalf("bands sick %s (%v) well %s (%v)", sick.GetBand(), sick.GetValue(), well.GetBand(), well.GetValue())
	}
	if sick.GetKind() != "model:"+man.Name || sick.GetRuleset() != man.Name || sick.GetRulesetVersion() != "1" || sick.GetRulesetHash() != man.SHA256 ||
		sick.GetPatient() != "sick" || sick.GetEventTimeMs() != at || sick.GetEmittedTimeMs() != at+5 || sick.GetId() == "" || sick.GetId() == well.GetId() {
		t.Fatalf("score %v", sick)
	}
	c := sick.GetComponents()
	if len(c) != 3 || c[0].GetParameter() != "heart_rate_last" || c[0].GetInputValue() != 135 || c[0].GetInputTimeMs() != at-60_000 ||
		c[0].GetInputUnit() != "/min" || c[2].GetInputValue() != 5 || c[0].GetMissing() {
		t.Fatalf("components %v", c)
	}
	// Heart rate 135 is far above the reference median (about 85).
	if tc := sick.GetTopContributors(); len(tc) != 1 || tc[0] != "heart_rate_last" {
		t.Fatalf("top contributors %v", tc)
	}
	if len(well.GetTopContributors()) != 0 {
		t.Fatalf("well top contributors %v", well.GetTopContributors())
	}
	if m := empty.GetMissing(); len(m) != 3 || !empty.GetComponents()[0].GetMissing() || empty.GetComponents()[0].GetInputValue() != 80 {
		t.Fatalf("empty patient: missing %v, components %v", m, empty.GetComponents())
	}
	if f := testutil.ToFloat64(mustVec(t, reg, "vigil_model_input_fills_total", man.Name, "spo2_last")); f != 1 {
		t.Fatalf("spo2 fills = %v, want 1", f)
	}

	// Drift: heart rates drawn like the reference keep the PSI low; a
	// population 30/min faster makes it a major shift (> 0.25).
	r := rand.New(rand.NewPCG(9, 9))
	ref := man.Inputs[0].Reference
	draw := func(shift float64) float64 {
		u, cum := r.Float64(), 0.0
		for i, p := range ref.Proportions {
			cum += p
			if u < cum || i == len(ref.Proportions)-1 {
				lo, hi := 50.0, 120.0
				if i > 0 {
					lo = ref.Edges[i-1]
				}
				if i < len(ref.Edges) {
					hi = ref.Edges[i]
				}
				return lo + (hi-lo)*r.Float64() + shift
			}
		}
		panic("unreachable")
	}
	psiAfter := func(shift float64) float64 {
		for k := 0; k < 10; k++ {
			b.Reset()
			for i := 0; i < 100; i++ {
				b.Add("t1", "p", at, &src{hr: draw(shift), hrMs: at, spo2: 97, spo2Ms: at, first: at - 1})
			}
			if _, err := md.Score(b, at); err != nil {
				t.Fatal(err)
			}
		}
		return testutil.ToFloat64(mustVec(t, reg, "vigil_model_input_drift_psi", man.Name, "heart_rate_last"))
	}
	if psi := psiAfter(0); psi > 0.05 {
		t.Fatalf("PSI of the reference distribution = %v, want < 0.05", psi)
	}
	if psi := psiAfter(30); psi < 0.25 {
		t.Fatalf("PSI of a +30/min shift = %v, want > 0.25", psi)
	}
}

// mustVec finds a labelled collector by gathering (the vectors are
// internal to the package).
func mustVec(t *testing.T, reg *prometheus.Registry, name, modelName, feature string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["model"] == modelName && labels["feature"] == feature {
				v := m.GetGauge().GetValue() + m.GetCounter().GetValue()
				g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "x", Help: "x"})
				g.Set(v)
				return g
			}
		}
	}
	t.Fatalf("no %s{model=%q,feature=%q}", name, modelName, feature)
	return nil
}

func TestRuntimeMissingLibrary(t *testing.T) {
	_, err := model.NewRuntime(model.RuntimeOptions{LibraryPath: "/nonexistent/libonnxruntime.so.1"})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/libonnxruntime.so.1") || !strings.Contains(err.Error(), "make onnxruntime") {
		t.Fatalf("error %v, want the path tried and `make onnxruntime`", err)
	}
	// Not a library at all.
	bogus := filepath.Join(t.TempDir(), "libonnxruntime.so.1")
	os.WriteFile(bogus, []byte("not ELF"), 0o644)
	_, err = model.NewRuntime(model.RuntimeOptions{LibraryPath: bogus})
	if err == nil || !strings.Contains(err.Error(), bogus) {
		t.Fatalf("error %v, want one naming %s", err, bogus)
	}
	// No path configured and nothing under the working directory or the
	// executable's folders: every searched path is named.
	t.Chdir(t.TempDir())
	_, err = model.NewRuntime(model.RuntimeOptions{})
	if err == nil {
		t.Fatal("no error without a library")
	}
	for _, p := range model.LibrarySearchPaths() {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %v does not name searched path %s", err, p)
		}
	}
}

func TestRegistryRefusesTamperedModel(t *testing.T) {
	_, onnx, _ := trainSynthetic(t, train.LogReg)
	dir := t.TempDir()
	man := testManifest("tampered", "2")
	vdir, err := model.Save(dir, man, onnx)
	if err != nil {
		t.Fatal(err)
	}
	reg := model.OpenRegistry(dir, nil)
	if _, _, err := reg.Load("tampered", "2"); err != nil {
		t.Fatal(err)
	}
	changed := append([]byte(nil), onnx...)
	changed[len(changed)-1] ^= 1
	if err := os.WriteFile(filepath.Join(vdir, model.ModelFile), changed, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err = reg.Load("tampered", "2")
	if err == nil || !strings.Contains(err.Error(), "refusing model tampered version 2") || !strings.Contains(err.Error(), man.SHA256) {
		t.Fatalf("tampered model: %v", err)
	}
	if _, _, err := reg.Load("absent", "latest"); err == nil || !strings.Contains(err.Error(), "not in registry") {
		t.Fatalf("absent model: %v", err)
	}
}
