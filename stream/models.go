package stream

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/detectors/alerting"
	"github.com/vigilhealth/vigil/detectors/model"
	"github.com/vigilhealth/vigil/features/window"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// models runs the configured ONNX models (detectors.models.run) at the
// engine's scoring points:
//
//   - change scores: after an input batch, when the patient's observed model
//     inputs (the values of last: sources and which inputs are missing, over
//     every configured model) differ from those of the last change score
//     (age_h:, stay_h and count: inputs change with every batch and alone do
//     not make a score);
//   - window-end scores: at every score-window end that gets a window-end
//     NEWS2 score, from the newest values among the closed score windows (as
//     NEWS2's). Their count: inputs are the counts applied so far, which may
//     include samples newer than the window end that came before it closed.
//
// The rows of every scoring point of one finish call (one processed input
// batch of a worker) go into one Arrow record per model and one ONNX
// Runtime run (prepare), before finish's in-order walk emits the scores
// with the others and runs the alert rules on them. A model whose run
// fails emits no scores for that batch (logged, counted in
// vigil_stream_model_errors_total).
//
// models is read-only after openModels and safe for concurrent use (the
// Models serialise their own runs); the per-call buffers are the
// outputs' (modelOutputs).
type models struct {
	list   []*model.Model
	rt     *model.Runtime
	ownRT  bool
	errors prometheus.Counter
	log    *slog.Logger
}

// Option is an optional argument of New.
type Option func(*options)

type options struct {
	runtime *model.Runtime
}

func newOptions(opts []Option) options {
	var o options
	for _, f := range opts {
		f(&o)
	}
	return o
}

// WithModelRuntime makes the processor open its models
// (detectors.models.run) on rt, which the caller owns and closes after the
// processor. Without it a processor with models configured creates its own
// Runtime (ONNX Runtime's environment is process-global: one open Runtime
// per process, so two such processors in one process need this option).
func WithModelRuntime(rt *model.Runtime) Option {
	return func(o *options) { o.runtime = rt }
}

// openModels loads detectors.models.run from the registry and opens them
// on rt (nil: a Runtime is created and owned, closed by close). It returns
// nil, costing the engine nothing, when no model is configured.
func openModels(cfg config.Config, rt *model.Runtime, cat *catalog.Catalog, deps stage.Deps) (*models, error) {
	mc := cfg.Detectors.Models
	if len(mc.Run) == 0 {
		return nil, nil
	}
	dir := mc.Registry
	if dir == "" {
		dir = cfg.Path("models")
	}
	reg := model.OpenRegistry(dir, cat)
	ms := &models{rt: rt, log: deps.Log}
	ms.errors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "vigil_stream_model_errors_total", Help: "Model runs that failed in the stream engine (their scores were not emitted).",
	})
	met, err := model.NewMetrics(deps.Metrics)
	if err != nil {
		return nil, err
	}
	if err := stage.Register(deps.Metrics, "stream model metrics", ms.errors); err != nil {
		return nil, err
	}
	if ms.rt == nil {
		if ms.rt, err = model.NewRuntime(model.RuntimeOptions{LibraryPath: mc.ONNXRuntimeLibrary, IntraOpThreads: mc.IntraOpThreads}); err != nil {
			return nil, fmt.Errorf("detectors.models: %w", err)
		}
		ms.ownRT = true
	}
	for i, ref := range mc.Run {
		man, onnx, err := reg.Load(ref.Name, ref.Version)
		if err == nil {
			var md *model.Model
			if md, err = ms.rt.Open(man, onnx, met, mc.DriftWindow); err == nil {
				ms.list = append(ms.list, md)
				deps.Log.Info("model loaded", "model", man.Name, "version", man.Version, "sha256", man.SHA256, "inputs", len(man.Inputs))
				continue
			}
		}
		ms.close()
		return nil, fmt.Errorf("detectors.models.run[%d]: %w", i, err)
	}
	return ms, nil
}

// close closes the models and, when owned, the runtime. Idempotent.
func (ms *models) close() error {
	if ms == nil {
		return nil
	}
	var errs []error
	for _, md := range ms.list {
		if err := md.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if ms.ownRT && ms.rt != nil {
		if err := ms.rt.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("closing models: %w", err)
	}
	return nil
}

// patientModels is a patient's model input state: its earliest accepted
// sample time, accepted observations per metric, and the digest of the
// observed inputs at its last change score.
type patientModels struct {
	firstMs int64
	counts  []metricCount
	digest  uint64
	// boundary: score-window end times above the watermark with a model
	// change score (no window-end model score there).
	boundary []int64
}

type metricCount struct {
	metric string
	n      int64
}

// observe records one accepted sample of metric at event time t.
func (ms *models) observe(p *patient, metric string, t int64) {
	pm := p.mdl
	if pm == nil {
		pm = &patientModels{firstMs: t}
		p.mdl = pm
	}
	if t < pm.firstMs {
		pm.firstMs = t
	}
	for i := range pm.counts {
		if pm.counts[i].metric == metric {
			pm.counts[i].n++
			return
		}
	}
	pm.counts = append(pm.counts, metricCount{metric: metric, n: 1})
}

// modelSource is the model.Source of one patient: values from vs (its
// latest or closed values), first-sample time and counts from pm.
type modelSource struct {
	vs []value
	pm *patientModels
}

func (s *modelSource) Latest(metric string) (float64, int64, bool) {
	for i := range s.vs {
		if s.vs[i].metric == metric {
			return s.vs[i].value, s.vs[i].timeMs, true
		}
	}
	return 0, 0, false
}

func (s *modelSource) FirstSampleMs() int64 {
	if s.pm == nil {
		return 0
	}
	return s.pm.firstMs
}

func (s *modelSource) Count(metric string) int {
	if s.pm == nil {
		return 0
	}
	for _, c := range s.pm.counts {
		if c.metric == metric {
			return int(c.n)
		}
	}
	return 0
}

// modelPlaceholder marks (in nwin) an outPendingScore output whose score
// prepare fills from a model run; win0 is the model's index.
const modelPlaceholder = -1

// modelOutputs are the per-outputs buffers of the model runs: one Batch
// per model; for each due window-end of the walk, whether the models score
// it (points), and the window-end scores prepare computed, in walk order
// (len(models) per scored point), which windowEnd takes from.
type modelOutputs struct {
	batches []*model.Batch
	vals    []model.Value
	src     modelSource
	points  []bool
	point   int
	queue   []*vigilv1.Score
	next    int
	scratch map[*patient][]value
}

// reset drops the rows of unfinished scoring points.
func (mo *modelOutputs) reset() {
	for _, b := range mo.batches {
		b.Reset()
	}
	mo.clearQueue()
}

func (mo *modelOutputs) clearQueue() {
	clear(mo.queue)
	mo.queue, mo.next, mo.points, mo.point = mo.queue[:0], 0, mo.points[:0], 0
}

func (mo *modelOutputs) init(ms *models) {
	if len(mo.batches) == 0 {
		for _, md := range ms.list {
			mo.batches = append(mo.batches, md.NewBatch())
		}
		mo.scratch = map[*patient][]value{}
	}
}

// change queues a change score of every model for p at its newest event
// time when the patient's observed model inputs changed since its last
// change score.
func (ms *models) change(e *engine, p *patient, nowMs int64, tr alerting.Trigger, out *outputs) {
	at := p.win.MaxEventTime()
	mo := &out.mdl
	mo.init(ms)
	mo.src = modelSource{vs: p.latest, pm: p.mdl}
	h := uint64(14695981039346656037)
	for _, md := range ms.list {
		man := md.Manifest()
		h = fnv(h, man.SHA256)
		mo.vals = man.Values(mo.vals, &mo.src, at)
		for i, v := range mo.vals {
			var b [9]byte
			if v.Missing {
				b[8] = 1
			} else if man.Inputs[i].Kind() == model.SourceLast {
				binary.LittleEndian.PutUint64(b[:8], math.Float64bits(v.Value))
			}
			h = fnv(h, b[:])
		}
	}
	if p.mdl == nil {
		p.mdl = &patientModels{}
	}
	if h == p.mdl.digest {
		return
	}
	p.mdl.digest = h
	if at%e.scoreMs == 0 && !slices.Contains(p.mdl.boundary, at) {
		p.mdl.boundary = append(p.mdl.boundary, at)
	}
	for i := range ms.list {
		mo.batches[i].Add(p.tenant, p.id, at, &mo.src)
		out.list = append(out.list, output{kind: outPendingScore, key: p.key, pt: p, tr: tr, nowMs: nowMs, nwin: modelPlaceholder, win0: i})
	}
}

// fnv is FNV-1a: the change digest is kept in the patient state, so it
// must be the same in every process (hash/maphash is seeded per process).
func fnv[T string | []byte](h uint64, s T) uint64 {
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return h
}

// isModelPlaceholder reports whether o is a change placeholder of change.
func isModelPlaceholder(o *output) bool {
	return o.kind == outPendingScore && o.nwin == modelPlaceholder && o.score == nil
}

// prepare is finish's first pass: it adds the window-end scoring points
// of the outWindows placeholders (the due score-window ends without a
// model change score at the same time; the closed values replayed from
// the record as finish's walk will set them, on a scratch copy), runs
// every model once on all its rows (change and window-end, in list order),
// and puts the scores into the change placeholders and the window-end
// queue.
func (ms *models) prepare(e *engine, out *outputs, cols *window.Columns) {
	mo := &out.mdl
	mo.init(ms)
	mo.clearQueue()
	clear(mo.scratch)
	// The change rows are in the batches already (change added them, in
	// list order); the window-end rows follow.
	nChange := mo.batches[0].Len()
	row := 0
	for _, o := range out.list[out.done:] {
		if o.kind != outWindows {
			continue
		}
		p := o.pt
		for _, w := range out.wins[o.win0 : o.win0+o.nwin] {
			if w.Window == e.scoreWin {
				closed, ok := mo.scratch[p]
				if !ok {
					closed = slices.Clone(p.closed)
				}
				for i := row; i < row+w.Rows; i++ {
					if !cols.DerivedMetric.Value(i) {
						closed = setValue(closed, value{metric: cols.Metric.Value(i), value: cols.Last.Value(i), timeMs: cols.LastTimeMs.Value(i)})
					}
				}
				mo.scratch[p] = closed
				if w.due {
					scored := p.mdl == nil || !slices.Contains(p.mdl.boundary, w.EndMs)
					mo.points = append(mo.points, scored)
					if scored {
						mo.src = modelSource{vs: closed, pm: p.mdl}
						for _, b := range mo.batches {
							b.Add(p.tenant, p.id, w.EndMs, &mo.src)
						}
					}
				}
			}
			row += w.Rows
		}
	}
	// Boundary times at or below a patient's watermark are past: their
	// windows have closed (in this call or before).
	for p := range mo.scratch {
		if p.mdl != nil {
			wm := p.win.Watermark()
			p.mdl.boundary = slices.DeleteFunc(p.mdl.boundary, func(t int64) bool { return t <= wm })
		}
	}
	for _, o := range out.list[out.done:] {
		if isModelPlaceholder(&o) && o.pt.mdl != nil {
			wm := o.pt.win.Watermark()
			o.pt.mdl.boundary = slices.DeleteFunc(o.pt.mdl.boundary, func(t int64) bool { return t <= wm })
		}
	}
	clear(mo.scratch)
	if mo.batches[0].Len() == 0 {
		return
	}
	results := make([][]*vigilv1.Score, len(ms.list))
	failed := false
	for i, md := range ms.list {
		var err error
		// (Emitted times are set per scoring point below.)
		if results[i], err = md.Score(mo.batches[i], 0); err != nil {
			ms.errors.Inc()
			ms.log.Error("model run failed; its scores for this batch are dropped", "model", md.Manifest().Name, "rows", mo.batches[i].Len(), "err", err)
			failed = true
		}
		mo.batches[i].Reset()
	}
	if failed {
		// Drop the change placeholders; windowEnd finds no scores.
		out.list = slices.DeleteFunc(out.list, func(o output) bool { return isModelPlaceholder(&o) })
		clear(mo.points)
		return
	}
	// Hand the scores out: change rows first, then window-end rows, each
	// in list order.
	nextChange, nextEnd := 0, nChange
	take := func(i, row int, nowMs int64) *vigilv1.Score {
		s := results[i][row]
		s.EmittedTimeMs = nowMs
		return s
	}
	pt := 0
	for k := out.done; k < len(out.list); k++ {
		o := &out.list[k]
		switch {
		case isModelPlaceholder(o):
			// One placeholder per model, in model order, per change point.
			o.score = take(o.win0, nextChange, o.nowMs)
			if o.win0 == len(ms.list)-1 {
				nextChange++
			}
		case o.kind == outWindows:
			for _, w := range out.wins[o.win0 : o.win0+o.nwin] {
				if w.Window == e.scoreWin && w.due {
					if mo.points[pt] {
						for i := range ms.list {
							mo.queue = append(mo.queue, take(i, nextEnd, o.nowMs))
						}
						nextEnd++
					}
					pt++
				}
			}
		}
	}
}

// windowEnd appends the window-end model scores prepared for p at endMs
// (and their alerts) to list; finish's walk calls it at every due
// score-window end, in the order prepare saw them.
func (ms *models) windowEnd(e *engine, list []output, p *patient, endMs int64, tr alerting.Trigger, out *outputs) []output {
	mo := &out.mdl
	if mo.point >= len(mo.points) {
		return list
	}
	scored := mo.points[mo.point]
	mo.point++
	if !scored {
		return list
	}
	for range ms.list {
		if mo.next >= len(mo.queue) {
			return list // the run failed
		}
		s := mo.queue[mo.next]
		mo.queue[mo.next] = nil
		mo.next++
		if s.GetPatient() != p.id || s.GetEventTimeMs() != endMs {
			panic(fmt.Sprintf("model window-end score for %s at %d taken for %s at %d", s.GetPatient(), s.GetEventTimeMs(), p.id, endMs))
		}
		list = e.emitScore(list, p, s, tr)
	}
	return list
}

// toProto renders the patient's model input state (nil when none).
func (pm *patientModels) toProto() *vigilv1.ModelInputState {
	if pm == nil {
		return nil
	}
	st := &vigilv1.ModelInputState{FirstSampleMs: pm.firstMs, Digest: pm.digest, Counts: make([]*vigilv1.ModelMetricCount, len(pm.counts)),
		BoundaryTimesMs: slices.Clone(pm.boundary)}
	for i, c := range pm.counts {
		st.Counts[i] = &vigilv1.ModelMetricCount{Metric: c.metric, Count: c.n}
	}
	slices.SortFunc(st.Counts, func(a, b *vigilv1.ModelMetricCount) int { return strings.Compare(a.Metric, b.Metric) })
	return st
}

// modelsFromProto restores a patient's model input state.
func modelsFromProto(st *vigilv1.ModelInputState) *patientModels {
	if st == nil {
		return nil
	}
	pm := &patientModels{firstMs: st.GetFirstSampleMs(), digest: st.GetDigest(), counts: make([]metricCount, len(st.GetCounts())),
		boundary: slices.Clone(st.GetBoundaryTimesMs())}
	for i, c := range st.GetCounts() {
		pm.counts[i] = metricCount{metric: c.GetMetric(), n: c.GetCount()}
	}
	return pm
}

// threshold returns the alert threshold in the manifest of the served
// model whose score kind is kind ("model:<name>"), for alert rules with
// `raise: manifest`. Safe for concurrent use (the list is read-only).
func (ms *models) threshold(kind string) (float64, bool) {
	for _, m := range ms.list {
		if man := m.Manifest(); man.Kind() == kind {
			return man.Threshold, true
		}
	}
	return 0, false
}
