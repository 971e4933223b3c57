package model

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/apache/arrow/go/v17/arrow"
	"github.com/apache/arrow/go/v17/arrow/array"
	"github.com/apache/arrow/go/v17/arrow/memory"
	"github.com/prometheus/client_golang/prometheus"
	ort "github.com/yalue/onnxruntime_go"

	"github.com/vigilhealth/vigil/detectors/ews"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Metrics are the model detector's Prometheus metrics, shared by every
// Model opened with them (labelled by model name). Safe for concurrent use.
type Metrics struct {
	latency *prometheus.HistogramVec
	batch   *prometheus.HistogramVec
	psi     *prometheus.GaugeVec
	fills   *prometheus.CounterVec
	scores  *prometheus.CounterVec
}

// NewMetrics registers the model metrics on reg (all or nothing).
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "vigil_model_inference_seconds", Help: "Time of one ONNX Runtime run (one batch of patients), by model.",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 16),
		}, []string{"model"}),
		batch: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "vigil_model_batch_size", Help: "Patients scored in one ONNX Runtime run, by model.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 14),
		}, []string{"model"}),
		psi: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vigil_model_input_drift_psi",
			Help: "Population stability index of a model input's recent observed values (bounded sliding window) against the manifest's training reference; > 0.25 is a major shift.",
		}, []string{"model", "feature"}),
		fills: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_model_input_fills_total", Help: "Model inputs that had no value and were filled with the manifest's fill value, by model and feature.",
		}, []string{"model", "feature"}),
		scores: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_model_scores_total", Help: "Patients scored by a model (rows of ONNX Runtime runs, including runs redone after an aborted transaction).",
		}, []string{"model"}),
	}
	if err := stage.Register(reg, "model metrics", m.latency, m.batch, m.psi, m.fills, m.scores); err != nil {
		return nil, err
	}
	return m, nil
}

// Model is an opened model version: its manifest, an ORT session and the
// per-model metric state. Score and Infer are safe for concurrent use (a
// mutex serialises runs: the input buffer and drift windows are reused).
type Model struct {
	man  *Manifest
	rt   *Runtime
	sess *ort.DynamicAdvancedSession

	mu       sync.Mutex
	closed   bool
	in       []float32 // row-major [N, F] input buffer, reused
	drift    []*driftWindow
	median   []float64
	spread   []float64
	hasRef   []bool
	alloc    memory.Allocator
	schema   *arrow.Schema
	latency  prometheus.Observer
	batch    prometheus.Observer
	scores   prometheus.Counter
	fills    []prometheus.Counter
	psi      []prometheus.Gauge
	contribN int
}

// DefaultDriftWindow is the number of recent observed values per input the
// drift PSI is computed over when Open is given 0.
const DefaultDriftWindow = 1000

// Open creates an ORT session for a model whose bytes the caller has
// checked against the manifest (Registry.Load does; Open checks again). window bounds the
// sliding count of recent inputs per feature for the drift PSI (0 means
// DefaultDriftWindow). Close the Model before the Runtime.
func (r *Runtime) Open(man *Manifest, onnx []byte, met *Metrics, window int) (*Model, error) {
	if got := SHA256Hex(onnx); got != man.SHA256 {
		return nil, fmt.Errorf("opening model %s version %s: model.onnx sha256 %s does not match the manifest's %s", man.Name, man.Version, got, man.SHA256)
	}
	if window <= 0 {
		window = DefaultDriftWindow
	}
	sess, err := r.session(man, onnx)
	if err != nil {
		return nil, err
	}
	n := len(man.Inputs)
	fields := make([]arrow.Field, n)
	md := &Model{
		man: man, rt: r, sess: sess, alloc: memory.NewGoAllocator(),
		drift: make([]*driftWindow, n), median: make([]float64, n), spread: make([]float64, n), hasRef: make([]bool, n),
		latency: met.latency.WithLabelValues(man.Name), batch: met.batch.WithLabelValues(man.Name),
		scores: met.scores.WithLabelValues(man.Name),
		fills:  make([]prometheus.Counter, n), psi: make([]prometheus.Gauge, n), contribN: 3,
	}
	for i := range man.Inputs {
		in := &man.Inputs[i]
		fields[i] = arrow.Field{Name: in.Name, Type: arrow.PrimitiveTypes.Float32}
		md.fills[i] = met.fills.WithLabelValues(man.Name, in.Name)
		md.median[i], md.spread[i], md.hasRef[i] = in.Reference.center()
		if md.hasRef[i] {
			md.drift[i] = newDriftWindow(window, len(in.Reference.Proportions))
			md.psi[i] = met.psi.WithLabelValues(man.Name, in.Name)
		}
	}
	md.schema = arrow.NewSchema(fields, nil)
	return md, nil
}

// Manifest returns the model's manifest (read-only).
func (md *Model) Manifest() *Manifest { return md.man }

// Close destroys the ORT session; idempotent.
func (md *Model) Close() error {
	md.mu.Lock()
	defer md.mu.Unlock()
	if md.closed {
		return nil
	}
	md.closed = true
	err := md.sess.Destroy()
	md.rt.release()
	if err != nil {
		return fmt.Errorf("closing model %s: %w", md.man.Name, err)
	}
	return nil
}

// Schema is the Arrow schema of the model's input records: one float32
// column per input, in manifest order, named as the inputs.
func (md *Model) Schema() *arrow.Schema { return md.schema }

// Infer runs the model once on an Arrow record of input vectors (Schema:
// one float32 column per input, no nulls) and returns P(positive) per row.
// The record stays the caller's.
func (md *Model) Infer(rec arrow.Record) ([]float64, error) {
	md.mu.Lock()
	defer md.mu.Unlock()
	return md.inferLocked(rec)
}

func (md *Model) inferLocked(rec arrow.Record) ([]float64, error) {
	if md.closed {
		return nil, fmt.Errorf("running model %s: closed", md.man.Name)
	}
	f := len(md.man.Inputs)
	if !rec.Schema().Equal(md.schema) {
		return nil, fmt.Errorf("running model %s: record schema %v, want %v", md.man.Name, rec.Schema(), md.schema)
	}
	n := int(rec.NumRows())
	if n == 0 {
		return nil, nil
	}
	// ORT wants one row-major [N, F] buffer; Arrow holds columns.
	md.in = slices.Grow(md.in[:0], n*f)[:n*f]
	for j := 0; j < f; j++ {
		col := rec.Column(j).(*array.Float32)
		if col.NullN() > 0 {
			return nil, fmt.Errorf("running model %s: input %s has nulls (fill them first)", md.man.Name, md.man.Inputs[j].Name)
		}
		for i, v := range col.Float32Values() {
			md.in[i*f+j] = v
		}
	}
	in, err := ort.NewTensor(ort.NewShape(int64(n), int64(f)), md.in)
	if err != nil {
		return nil, fmt.Errorf("running model %s: input tensor: %w", md.man.Name, err)
	}
	defer in.Destroy()
	outs := []ort.Value{nil}
	start := time.Now()
	if err := md.sess.Run([]ort.Value{in}, outs); err != nil {
		return nil, fmt.Errorf("running model %s version %s: %w", md.man.Name, md.man.Version, err)
	}
	md.latency.Observe(time.Since(start).Seconds())
	md.batch.Observe(float64(n))
	md.scores.Add(float64(n))
	defer outs[0].Destroy()
	return md.column(outs[0], n)
}

// column picks P(positive) per row out of the output value.
func (md *Model) column(v ort.Value, n int) ([]float64, error) {
	shape := v.GetShape()
	k := int64(1)
	switch {
	case len(shape) == 1 && shape[0] == int64(n):
	case len(shape) == 2 && shape[0] == int64(n):
		k = shape[1]
	default:
		return nil, fmt.Errorf("running model %s: output %s has shape %v, want [%d] or [%d, K]", md.man.Name, md.man.Output.Name, shape, n, n)
	}
	idx := int64(md.man.Output.Index)
	if idx >= k {
		return nil, fmt.Errorf("running model %s: output.index %d but output %s has %d columns", md.man.Name, idx, md.man.Output.Name, k)
	}
	out := make([]float64, n)
	switch t := v.(type) {
	case *ort.Tensor[float32]:
		d := t.GetData()
		for i := range out {
			out[i] = float64(d[int64(i)*k+idx])
		}
	case *ort.Tensor[float64]:
		d := t.GetData()
		for i := range out {
			out[i] = d[int64(i)*k+idx]
		}
	default:
		return nil, fmt.Errorf("running model %s: output %s is %v of %v, want a float tensor (export tree classifiers without ZipMap)",
			md.man.Name, md.man.Output.Name, v.GetONNXType(), v.DataType())
	}
	return out, nil
}

// Batch collects the input vectors of the patients scored in one processed
// input batch, for one Score call. Not concurrency-safe; reuse it with
// Reset (its buffers grow to the largest batch).
type Batch struct {
	man  *Manifest
	rows []batchRow
	vals []Value // row-major [N, F]
}

type batchRow struct {
	tenant, patient string
	atMs            int64
}

// NewBatch returns an empty batch for the model.
func (md *Model) NewBatch() *Batch { return &Batch{man: md.man} }

// Add computes the patient's inputs from src at scoring time atMs and
// appends them as one row.
func (b *Batch) Add(tenant, patient string, atMs int64, src Source) {
	b.rows = append(b.rows, batchRow{tenant: tenant, patient: patient, atMs: atMs})
	for i := range b.man.Inputs {
		b.vals = append(b.vals, b.man.Eval(i, src, atMs))
	}
}

// Len is the number of rows.
func (b *Batch) Len() int { return len(b.rows) }

// Reset empties the batch, keeping its buffers.
func (b *Batch) Reset() {
	clear(b.rows) // drop string references
	b.rows, b.vals = b.rows[:0], b.vals[:0]
}

// Record builds the Arrow record of the batch's input vectors (Schema of
// the model). The caller releases it.
func (md *Model) Record(b *Batch) arrow.Record {
	f := len(md.man.Inputs)
	rb := array.NewRecordBuilder(md.alloc, md.schema)
	defer rb.Release()
	for j := 0; j < f; j++ {
		fb := rb.Field(j).(*array.Float32Builder)
		fb.Reserve(len(b.rows))
		for i := range b.rows {
			fb.UnsafeAppend(float32(b.vals[i*f+j].Value))
		}
	}
	return rb.NewRecord()
}

// Score runs the model once on the batch (as one Arrow record) and
// returns one Score per row, in row order: kind "model:<name>", value
// P(positive), band "high" at or above the manifest threshold else "low",
// ruleset/version/hash from the manifest, one component per input (value,
// unit, time, missing; points = the input's distance from its reference
// median in reference-spread units), missing inputs listed, and the top
// contributors: up to three observed inputs at least one spread from their
// reference median, farthest first. It also counts fills and updates the
// drift windows and PSI gauges. emittedMs stamps the scores.
func (md *Model) Score(b *Batch, emittedMs int64) ([]*vigilv1.Score, error) {
	if b.Len() == 0 {
		return nil, nil
	}
	md.mu.Lock()
	defer md.mu.Unlock()
	rec := md.Record(b)
	defer rec.Release()
	ps, err := md.inferLocked(rec)
	if err != nil {
		return nil, err
	}
	man := md.man
	f := len(man.Inputs)
	kind := man.Kind()
	out := make([]*vigilv1.Score, len(b.rows))
	comps := make([]vigilv1.ScoreComponent, len(b.rows)*f)
	type dist struct {
		name string
		d    float64
	}
	var top []dist
	for i, row := range b.rows {
		p := ps[i]
		if math.IsNaN(p) {
			return nil, fmt.Errorf("running model %s: NaN output for row %d", man.Name, i)
		}
		band := "low"
		if p >= man.Threshold {
			band = "high"
		}
		s := &vigilv1.Score{
			SchemaVersion: 1, Id: ews.ScoreID(row.tenant, row.patient, kind, row.atMs, man.SHA256),
			Tenant: row.tenant, Patient: row.patient, Kind: kind, Value: p, Band: band,
			Ruleset: man.Name, RulesetVersion: man.Version, RulesetHash: man.SHA256,
			EventTimeMs: row.atMs, EmittedTimeMs: emittedMs,
			Components: make([]*vigilv1.ScoreComponent, f),
		}
		top = top[:0]
		for j := range man.Inputs {
			in := &man.Inputs[j]
			v := b.vals[i*f+j]
			c := &comps[i*f+j]
			c.Parameter, c.Metric, c.InputValue, c.InputUnit, c.InputTimeMs, c.Missing = in.Name, in.src.metric, v.Value, in.Unit, v.TimeMs, v.Missing
			if v.Missing {
				s.Missing = append(s.Missing, in.Name)
				md.fills[j].Inc()
			} else if md.hasRef[j] {
				c.Points = math.Abs(v.Value-md.median[j]) / md.spread[j]
				if c.Points >= 1 {
					top = append(top, dist{in.Name, c.Points})
				}
				md.drift[j].add(in.Reference.bin(v.Value))
			}
			s.Components[j] = c
		}
		slices.SortStableFunc(top, func(a, b dist) int { return cmp.Compare(b.d, a.d) })
		for k := 0; k < len(top) && k < md.contribN; k++ {
			s.TopContributors = append(s.TopContributors, top[k].name)
		}
		out[i] = s
	}
	for j := range man.Inputs {
		if md.hasRef[j] {
			md.psi[j].Set(man.Inputs[j].Reference.PSI(md.drift[j].counts))
		}
	}
	return out, nil
}

// ErrNoModel is returned by Registry.Load when no version of a model
// exists.
var ErrNoModel = errors.New("model not in registry")
