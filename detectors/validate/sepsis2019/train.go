package sepsis2019

import (
	"context"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/vigilhealth/vigil/detectors/model"
	"github.com/vigilhealth/vigil/detectors/model/export"
	"github.com/vigilhealth/vigil/detectors/model/train"
	"github.com/vigilhealth/vigil/features/window"
	"github.com/vigilhealth/vigil/internal/catalog"
)

// ModelName is the name of the model TrainModel makes (score kind
// "model:sepsis").
const ModelName = "sepsis"

// modelFeatures are the inputs of the sepsis model: for each mapped
// column's metric its last value and the hours since it, and the hours
// since admission. Missing last: values are filled with the training
// median (see TrainModel), age_h: with 1000 h ("never").
//
// No count: inputs: the stream engine's window-end model scores take
// count: from every sample applied when the window closes, which depends on
// how many input records one poll took (processing, not event, time), so
// training rows could not reproduce them.
func modelFeatures() []model.Input {
	var ins []model.Input
	for _, c := range columns {
		ins = append(ins,
			model.Input{Name: c.Metric + "_last", Source: "last:" + c.Metric, Unit: unitOfMetric(c.Metric)},
			model.Input{Name: c.Metric + "_age_h", Source: "age_h:" + c.Metric, Unit: "h", Fill: 1000})
	}
	return append(ins, model.Input{Name: "stay_h", Source: "stay_h", Unit: "h"})
}

// unitOfMetric is the canonical unit of a metric of the embedded
// catalogue (what the samples were validated into).
func unitOfMetric(metric string) string {
	if m, ok := catalog.Default().Lookup(metric); ok {
		return m.Unit
	}
	return ""
}

// Matrix is a dense feature matrix: one row per input row of the patients
// it was built from, in order.
type Matrix struct {
	X      []float32 // row-major, Cols per row
	Cols   int
	Labels []bool
	// Missing[i*Cols+j] tells that input j of row i was filled.
	Missing []bool
}

// BuildMatrix computes m's input vectors for every row of the patients:
// the vector of the model score that the row reads in the pipeline (the
// newest at or before the row's time), as the stream engine makes them
// (stream/models.go), over the carried-forward inputs (the admission
// consciousness sample, then each row's accepted samples, one batch per
// row that has any):
//   - a change score at a batch's time when the batch changed the
//     observed last: inputs (values or which are missing) since the last
//     change score (always for the first batch), from the inputs after the
//     batch;
//   - a window-end score one minute after each batch (the end of its
//     1-minute score window), emitted when the next batch closes that
//     window: last: and age_h: from the values up to the window end
//     (count: from what was applied when the window closed, which
//     BuildMatrix takes as up to the closing batch but the engine does
//     not reproduce: see modelFeatures); the values are the windows' last
//     features, quantised to the metric's decimals of the window spec
//     (decimals; a metric not in it is not rounded). The stream's idle
//     timeout is off in a validation run, so the last batch's window
//     never closes.
func BuildMatrix(m *model.Manifest, pts []*Canonical, decimals map[string]int) *Matrix {
	mx := &Matrix{Cols: len(m.Inputs)}
	type point struct {
		at   int64
		vals []model.Value
	}
	for _, c := range pts {
		carry := NewCarry()
		var points []point
		var lastKey []float64
		prevT := int64(-1)
		batch := func(at int64, ss []Sample) {
			if prevT >= 0 {
				// The window of the previous batch closes now.
				before := carry.clone()
				before.quantise(decimals)
				carry.Add(ss...)
				end := prevT + time.Minute.Milliseconds()
				points = append(points, point{at: end, vals: m.Values(nil, windowEnd{before, carry}, end)})
			} else {
				carry.Add(ss...)
			}
			prevT = at
			key := lastKeyOf(m, carry, at)
			if lastKey == nil || !slices.EqualFunc(key, lastKey, func(a, b float64) bool { return a == b || math.IsNaN(a) && math.IsNaN(b) }) {
				lastKey = key
				points = append(points, point{at: at, vals: m.Values(nil, carry, at)})
			}
		}
		// Every batch first: a window-end score exists once a later batch
		// closed its window, whichever row reads it.
		batch(c.Admission.TimeMs, []Sample{c.Admission})
		for i := range c.Patient.Rows {
			if ss := c.Rows[i]; len(ss) > 0 {
				batch(c.Patient.Rows[i].TimeMs(), ss)
			}
		}
		j := 0
		var cur []model.Value
		for i := range c.Patient.Rows {
			r := &c.Patient.Rows[i]
			for ; j < len(points) && points[j].at <= r.TimeMs(); j++ {
				cur = points[j].vals
			}
			for _, v := range cur {
				mx.X = append(mx.X, float32(v.Value))
				mx.Missing = append(mx.Missing, v.Missing)
			}
			if cur == nil {
				for _, in := range m.Inputs {
					mx.X = append(mx.X, float32(in.Fill))
					mx.Missing = append(mx.Missing, true)
				}
			}
			mx.Labels = append(mx.Labels, r.Label)
		}
	}
	return mx
}

// lastKeyOf is what decides a model change score: the values of the last:
// inputs, NaN where missing.
func lastKeyOf(m *model.Manifest, src model.Source, at int64) []float64 {
	var key []float64
	for i := range m.Inputs {
		if m.Inputs[i].Kind() != model.SourceLast {
			continue
		}
		v := m.Eval(i, src, at)
		if v.Missing {
			key = append(key, math.NaN())
		} else {
			key = append(key, v.Value)
		}
	}
	return key
}

// windowEnd is the Source of a window-end score: values as of the window
// end, counts as applied when it closed.
type windowEnd struct {
	values, counts *Carry
}

func (w windowEnd) Latest(metric string) (float64, int64, bool) { return w.values.Latest(metric) }
func (w windowEnd) FirstSampleMs() int64                        { return w.values.FirstSampleMs() }
func (w windowEnd) Count(metric string) int                     { return w.counts.Count(metric) }

// TrainOptions configure TrainModel.
type TrainOptions struct {
	// Registry is the model registry folder the model is saved to.
	Registry string
	// Data describes the training data in the manifest.
	Data string
	// Seed is the split seed (recorded) and the trainer's seed.
	Seed uint64
	// Config is the trainer's configuration (zero: train.DefaultConfig,
	// gradient-boosted trees).
	Config train.Config
	// WindowSpec is the stream's window spec file (stream.windows.spec;
	// empty: the embedded one), whose decimals the window-end scores' values
	// are quantised to.
	WindowSpec string
	// Progress, when set, receives a line per step.
	Progress func(format string, args ...any)
}

// Decimals returns the decimals per metric of the window spec at path
// (empty: the embedded spec).
func Decimals(specPath string) (map[string]int, error) {
	spec, err := window.LoadSpec(specPath)
	if err != nil {
		return nil, fmt.Errorf("stream.windows.spec: %w", err)
	}
	out := make(map[string]int, len(spec.Metrics))
	for k, m := range spec.Metrics {
		out[k] = m.Decimals
	}
	return out, nil
}

// Trained is what TrainModel made.
type Trained struct {
	Manifest *model.Manifest
	Dir      string
	// TrainAUROC and TrainUtility are in-sample (the 70 %), at Threshold;
	// TestAUROC and TestUtility are the trainer's own predictions on the
	// held-out patients (what the pipeline's model scores must reproduce).
	TrainAUROC, TrainUtility, TestAUROC, TestUtility float64
	Elapsed                                          time.Duration
	// Model is the trained model (its Predict is what ONNX Runtime must
	// reproduce).
	Model *train.Model
}

// TrainModel trains the sepsis model on the training patients: features
// from modelFeatures (BuildMatrix), gradient-boosted trees
// (detectors/model/train), exported to ONNX (detectors/model/export), with
// the alert threshold that maximises the normalised utility on the
// training patients. It saves model.onnx and its manifest (training
// description, in-sample and held-out metrics) to the registry and returns
// them. It blocks for the whole training (minutes on the full set B).
func TrainModel(ctx context.Context, trainPts, testPts []*Canonical, o TrainOptions) (*Trained, error) {
	began := time.Now()
	say := o.Progress
	if say == nil {
		say = func(string, ...any) {}
	}
	m := &model.Manifest{
		Name: ModelName, Version: "0", SHA256: fmt.Sprintf("%064x", 0), Created: time.Now().UTC().Truncate(time.Second),
		Algorithm: train.GBT, Inputs: modelFeatures(), InputName: export.DefaultIn,
		Output: model.Output{Name: export.DefaultOut, Index: 1},
	}
	if o.Config.Algorithm != "" {
		m.Algorithm = o.Config.Algorithm
	}
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("sepsis model manifest: %w", err)
	}
	// Medians of the observed last: values fill the missing ones; the
	// reference distributions are the deciles of the observed values.
	decimals, err := Decimals(o.WindowSpec)
	if err != nil {
		return nil, err
	}
	raw := BuildMatrix(m, trainPts, decimals)
	for j := range m.Inputs {
		var obs []float64
		for i := j; i < len(raw.X); i += raw.Cols {
			if !raw.Missing[i] {
				obs = append(obs, float64(raw.X[i]))
			}
		}
		slices.Sort(obs)
		if m.Inputs[j].Kind() == model.SourceLast && len(obs) > 0 {
			m.Inputs[j].Fill = obs[len(obs)/2]
		}
		m.Inputs[j].Reference = reference(obs)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	trainX := BuildMatrix(m, trainPts, decimals)
	y := make([]float64, len(trainX.Labels))
	pos := 0
	for i, l := range trainX.Labels {
		if l {
			y[i] = 1
			pos++
		}
	}
	cfg := o.Config
	if cfg.Algorithm == "" {
		cfg = train.DefaultConfig()
	}
	cfg.Seed = int64(o.Seed)
	say("training %s on %d rows of %d patients (%d positive rows), %d features", cfg.Algorithm, len(y), len(trainPts), pos, trainX.Cols)
	fit, err := train.Fit(trainX.X, y, trainX.Cols, cfg)
	if err != nil {
		return nil, fmt.Errorf("training the sepsis model: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	trainP := fit.PredictBatch(trainX.X, nil)
	tp := patientsOf(trainPts)
	thr, trainU := BestThreshold(tp, trainP)
	trainAUC, _ := AUROC(trainP, trainX.Labels)
	testX := BuildMatrix(m, testPts, decimals)
	testP := fit.PredictBatch(testX.X, nil)
	te := patientsOf(testPts)
	testEval, err := Evaluate("model:"+ModelName, "held-out", te, testP, thr, nil)
	if err != nil {
		return nil, err
	}
	say("threshold %.4g: utility %.4f (training patients), held-out AUROC %.4f utility %.4f", thr, trainU, testEval.AUROC, testEval.Utility)
	m.Threshold = thr
	m.Training = model.Training{Data: o.Data, Rows: int64(len(y)), Patients: int64(len(trainPts)), Positives: int64(pos),
		Seed: int64(o.Seed), Split: fmt.Sprintf("70/30 by patient, PCG seed %d (sepsis2019.Split); %d held out", o.Seed, len(testPts))}
	m.Description = "Sepsis (PhysioNet/CinC 2019 SepsisLabel, 6 h ahead of onset) from carried-forward hourly vitals; " +
		"threshold maximises the challenge's normalised utility on the training patients."
	m.Metrics = map[string]float64{"train_auroc": trainAUC, "train_utility": trainU,
		"heldout_auroc": testEval.AUROC, "heldout_utility": testEval.Utility}
	onnx, err := export.Marshal(fit, export.Options{GraphName: ModelName, Doc: m.Description})
	if err != nil {
		return nil, err
	}
	m.Version = fmt.Sprintf("%dp-s%d-%s", len(trainPts), o.Seed, model.SHA256Hex(onnx)[:8])
	dir, err := model.Save(o.Registry, m, onnx)
	if err != nil {
		return nil, err
	}
	return &Trained{Manifest: m, Dir: dir, TrainAUROC: trainAUC, TrainUtility: trainU,
		TestAUROC: testEval.AUROC, TestUtility: testEval.Utility, Elapsed: time.Since(began), Model: fit}, nil
}

func patientsOf(cs []*Canonical) []*Patient {
	ps := make([]*Patient, len(cs))
	for i, c := range cs {
		ps[i] = c.Patient
	}
	return ps
}

// reference bins sorted observed values at their deciles (distinct edges).
func reference(sorted []float64) model.Reference {
	if len(sorted) < 10 {
		return model.Reference{}
	}
	var edges []float64
	for q := 1; q < 10; q++ {
		e := sorted[q*len(sorted)/10]
		if len(edges) == 0 || e > edges[len(edges)-1] {
			edges = append(edges, e)
		}
	}
	props := make([]float64, len(edges)+1)
	for _, v := range sorted {
		i, _ := slices.BinarySearch(edges, v)
		// bin i holds edges[i-1] <= v < edges[i]
		if i < len(edges) && edges[i] == v {
			i++
		}
		props[i]++
	}
	for i := range props {
		props[i] /= float64(len(sorted))
	}
	return model.Reference{Edges: edges, Proportions: props}
}

// BestThreshold returns the threshold among the distinct percentiles
// (0.5 % steps) of preds that maximises the normalised utility over the
// patients (preds: one per row of pts, in order), and that utility.
func BestThreshold(pts []*Patient, preds []float64) (float64, float64) {
	sorted := slices.Clone(preds)
	slices.Sort(sorted)
	best, bestU := math.NaN(), math.Inf(-1)
	prev := math.NaN()
	for q := 1; q < 200; q++ {
		t := sorted[q*len(sorted)/200]
		if t == prev {
			continue
		}
		prev = t
		u := UtilitySum{Params: OfficialUtility()}
		i := 0
		for _, p := range pts {
			ls := make([]bool, len(p.Rows))
			ps := make([]bool, len(p.Rows))
			for j, r := range p.Rows {
				ls[j], ps[j] = r.Label, preds[i+j] >= t
			}
			_ = u.Add(ls, ps) // equal lengths
			i += len(p.Rows)
		}
		if v := u.Normalized(); v > bestU {
			best, bestU = t, v
		}
	}
	return best, bestU
}
