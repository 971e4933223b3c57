package stream

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/apache/arrow/go/v17/arrow/memory"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/detectors/alerting"
	"github.com/vigilhealth/vigil/detectors/ews"
	"github.com/vigilhealth/vigil/features/window"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/config"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// engine is the per-patient processing, free of Kafka: given a patient's
// state and one input batch it updates the state and appends the outputs.
// The event-time windows are features/window's (the spec of
// stream.windows.spec); their features come out as Arrow record batches,
// which the window-end NEWS2 score reads before they are encoded for the
// features topic.
//
// It is deterministic: the same state and batch give the same state and
// outputs, except the emitted/refused processing times. Processing time
// enters only through nowMs (the processor's clock): as the time a patient
// was last seen, and in idle, which closes the windows of a patient silent
// for stream.windows.idle_timeout. The engine holds no mutable state of
// its own and is safe for concurrent use on different patients (each
// caller passes its own outputs).
type engine struct {
	win *window.Engine
	// scoreWin is the spec's tumbling window of stream.window, at whose
	// ends the window-end scores are taken; scoreMs its size.
	scoreWin string
	scoreMs  int64
	idleMs   int64
	// scores are the detectors.scores tables (scores.go).
	scores []scoreTable
	alerts *alerting.Evaluator
	// alerts evaluates alerts.lifecycle.rules; alertRules is what its
	// rules over window features read (alerts.go).
	alertRules *alertRules
	catalog    *catalog.Catalog
	// baselines is detectors.baselines (nil: none configured).
	baselines *baselines
	// models is detectors.models (models.go; nil: none configured).
	models *models
	// mem allocates the Arrow feature batches (the Go allocator; tests
	// pass a checked one).
	mem memory.Allocator
}

// newEngine compiles the window spec (cfg.Stream.Windows.Spec, or the
// embedded one) against the catalogue.
func newEngine(cfg config.Config, rs *ews.Ruleset, cat *catalog.Catalog, mem memory.Allocator) (*engine, error) {
	spec, err := window.LoadSpec(cfg.Stream.Windows.Spec)
	if err != nil {
		return nil, fmt.Errorf("stream.windows.spec: %w", err)
	}
	w, err := window.Compile(spec, window.Options{OutOfOrderness: cfg.Stream.OutOfOrderness, AllowedLateness: cfg.Stream.Windows.AllowedLateness},
		func(metric string) (window.MetricInfo, bool) {
			m, ok := cat.Lookup(metric)
			if !ok {
				return window.MetricInfo{}, false
			}
			return window.MetricInfo{Unit: m.Unit, ExpectedInterval: time.Duration(m.ExpectedIntervalS * float64(time.Second))}, true
		})
	if err != nil {
		return nil, fmt.Errorf("stream.windows.spec: %w", err)
	}
	e := &engine{win: w, scoreMs: cfg.Stream.Window.Milliseconds(), idleMs: cfg.Stream.Windows.IdleTimeout.Milliseconds(),
		catalog: cat, mem: mem}
	if e.scores, err = newScoreTables(cfg, rs); err != nil {
		return nil, err
	}
	if e.alerts, e.alertRules, err = newAlertRules(cfg, spec); err != nil {
		return nil, err
	}
	for _, ws := range spec.Windows {
		if ws.Kind == "tumbling" && ws.Size == cfg.Stream.Window {
			e.scoreWin = ws.Name
		}
	}
	if e.scoreWin == "" {
		return nil, fmt.Errorf("stream.window: the window spec has no tumbling window of %s for the window-end scores", cfg.Stream.Window)
	}
	if e.baselines, err = newBaselines(cfg, cat); err != nil {
		return nil, err
	}
	return e, nil
}

// value is the newest value of one metric.
type value struct {
	metric, unit string
	value        float64
	timeMs       int64
	ingestTimeMs int64
}

// patient is one patient's state, owned by the partition that owns the
// patient's key.
type patient struct {
	key, tenant, id string
	eng             *window.Engine
	win             *window.Patient
	latest          []value // one entry per metric, unordered
	closed          []value // newest values among closed score windows
	alerts          alerting.State
	// scores is the state of each detectors.scores table (scores.go).
	scores     []kindScore
	lastSeenMs int64
	// location is the newest SampleBatch.location (for alert events).
	location string
	base     *patientBaselines
	// mdl is the model input state (models.go; nil without models).
	mdl *patientModels
	// latestFn and closedFn look metrics up in latest and closed: made
	// once per patient, so that scoring does not allocate a closure.
	latestFn, closedFn func(string) (ews.Observation, bool)
}

func (e *engine) newPatient(key, tenant, id string) *patient {
	p := &patient{key: key, tenant: tenant, id: id, eng: e.win, win: window.NewPatient(), scores: e.newKindScores()}
	p.latestFn = func(m string) (ews.Observation, bool) { return find(p.latest, m) }
	p.closedFn = func(m string) (ews.Observation, bool) { return find(p.closed, m) }
	return p
}

// warm reads the parts of p's state that applying a batch uses (see
// window.Patient.Warm) and returns a value of no meaning.
func (p *patient) warm() uint64 {
	x := p.win.Warm()
	if len(p.latest) > 0 {
		x += uint64(p.latest[len(p.latest)-1].timeMs)
	}
	return x
}

// empty reports whether the patient holds no state worth keeping.
func (p *patient) empty() bool {
	return p.win.Empty() && len(p.latest) == 0 && len(p.closed) == 0 && p.alerts.Empty() && p.noScores() && p.base == nil
}

// setValue records v as the newest value of its metric unless a newer one
// is known (ties: the later arrival wins).
func setValue(vs []value, v value) []value {
	for i := range vs {
		if vs[i].metric == v.metric {
			if v.timeMs >= vs[i].timeMs {
				vs[i] = v
			}
			return vs
		}
	}
	return append(vs, v)
}

// find returns the value of metric in vs.
func find(vs []value, metric string) (ews.Observation, bool) {
	for i := range vs {
		if vs[i].metric == metric {
			return ews.Observation{Value: vs[i].value, Unit: vs[i].unit, TimeMs: vs[i].timeMs}, true
		}
	}
	return ews.Observation{}, false
}

// outKind names an output topic.
type outKind uint8

const (
	outFeatures outKind = iota
	outScore
	outAlert
	outDeadLetter
	// Placeholders that finish replaces: the windows a call closed
	// (their rows in the Arrow batch: wins[win0:win0+nwin] of outputs),
	// and a change score whose alert rules have not run yet.
	outWindows
	outPendingScore
)

// output is one record to produce, keyed by the patient (or, for dead
// letters, by source name), or a placeholder (outWindows,
// outPendingScore) of patient pt.
type output struct {
	kind outKind
	key  string
	dl   *vigilv1.DeadLetter
	fw   *vigilv1.FeatureWindow
	// val is the encoded FeatureWindow of an outFeatures output of
	// batched outputs (which have no fw).
	val   []byte
	score *vigilv1.Score
	alert *vigilv1.AlertEvent
	// placeholders
	pt         *patient
	tr         alerting.Trigger
	nowMs      int64
	win0, nwin int
}

// closedWindow is a window whose rows are in the Arrow batch, waiting
// for finish; due: it is the first emission of a score window, whose end
// is a window-end scoring point; scores: the tables (bit i: table i) whose
// window-end score is to be taken there.
type closedWindow struct {
	window.WindowRows
	due    bool
	scores uint32
}

// outputs collects what the engine produces; reused between transactions.
// It belongs to one goroutine.
//
// The features of closed windows go into its Arrow batch (allocated on
// first use from the engine's allocator and kept for reuse: release frees
// it), and the outputs that depend on them (features, window-end scores,
// and the alerts of every score, which must run in order) wait as
// placeholders in list until finish turns the batch into one record and
// replaces them. Unless batched is set, the engine's calls finish before
// returning; a batched owner (the processor's workers) calls finish once
// for many calls, which is what makes the Arrow records cheap.
type outputs struct {
	list []output
	// counts since the last reset
	samples, late, invalid, corrections int
	batch                               *window.Batch
	batched                             bool
	// wins are the windows of the outWindows placeholders; seen counts
	// the batch's Windows already in wins.
	wins []closedWindow
	seen int
	// done: list[:done] holds no placeholder.
	done  int
	spare []output
	fws   []*vigilv1.FeatureWindow
	// slab holds the encoded records of batched outputs.
	slab slab
	// mdl holds the model runs' buffers (models.go).
	mdl modelOutputs
}

// reset empties the outputs, dropping unfinished placeholders.
func (o *outputs) reset() {
	clear(o.list)
	o.list = o.list[:0]
	o.samples, o.late, o.invalid, o.corrections = 0, 0, 0, 0
	if o.batch != nil && (o.batch.Len() > 0 || len(o.batch.Windows()) > 0) {
		o.batch.NewRecord().Release()
	}
	o.wins, o.seen, o.done = o.wins[:0], 0, 0
	o.mdl.reset()
}

// recycle empties the list of produced outputs.
func (o *outputs) recycle() {
	clear(o.list)
	o.list = o.list[:0]
	o.done = 0
}

// maxBatchRows is the number of feature rows past which a batched owner
// finishes its outputs early (finishDue), which bounds the Arrow buffers
// (and those a Batch keeps for reuse) to a few hundred KiB: records of a
// few hundred rows already make the per-record costs negligible.
const maxBatchRows = 512

// finishDue reports whether the owner of batched outputs should call
// finish now.
func (o *outputs) finishDue() bool {
	return o.batch != nil && o.batch.Len() >= maxBatchRows
}

// release frees the Arrow batch. Idempotent.
func (o *outputs) release() {
	if o.batch != nil {
		o.batch.Release()
		o.batch = nil
	}
}

func (o *outputs) features(e *engine) *window.Batch {
	if o.batch == nil {
		o.batch = window.NewBatch(e.mem)
	}
	return o.batch
}

// apply processes one input batch for patient p: samples into windows and
// latest values (a sample whose windows closed more than allowed_lateness
// before the watermark goes to a "too_late" dead letter; one inside it
// makes its closed windows come again as corrections), the windows the new
// watermark closes emitted as features with their window-end scores, and
// a score emitted when the batch changed it; every emitted score runs the
// alert rules. It reports whether p changed.
func (e *engine) apply(p *patient, b *vigilv1.SampleBatch, nowMs int64, out *outputs) bool {
	if b.GetAlertCommand() != nil && len(b.GetSamples()) == 0 {
		return e.command(p, b, nowMs, out)
	}
	ingest := b.GetIngestTimeMs()
	var late, invalid, unknown []int
	accepted := 0
	for i, s := range b.GetSamples() {
		out.samples++
		v, t := s.GetValue(), s.GetEventTimeMs()
		if math.IsNaN(v) || math.IsInf(v, 0) {
			invalid = append(invalid, i)
			continue
		}
		// Only catalogue metrics are kept: this bounds a patient's state.
		m, known := e.catalog.Lookup(s.GetMetric())
		if !known {
			unknown = append(unknown, i)
			continue
		}
		if mi, windowed := e.win.Metric(m.ID); windowed {
			switch e.win.Add(p.win, mi, t, v) {
			case window.TooLate:
				late = append(late, i)
				continue
			case window.OutOfRange:
				invalid = append(invalid, i)
				continue
			}
		} else {
			e.win.Touch(p.win, t)
		}
		unit := s.GetUnit()
		if unit == "" {
			unit = m.Unit
		}
		p.latest = setValue(p.latest, value{metric: m.ID, unit: unit, value: v, timeMs: t, ingestTimeMs: ingest})
		if e.models != nil {
			e.models.observe(p, m.ID, t)
		}
		accepted++
	}
	if len(late) > 0 {
		out.late += len(late)
		out.list = append(out.list, output{kind: outDeadLetter, dl: deadLetter(b, late, "too_late",
			fmt.Sprintf("%d sample(s) fall in windows closed more than allowed_lateness ago: the patient's watermark is %d", len(late), p.win.Watermark()), nowMs)})
	}
	if len(invalid) > 0 {
		out.invalid += len(invalid)
		out.list = append(out.list, output{kind: outDeadLetter, dl: deadLetter(b, invalid, "out_of_range",
			fmt.Sprintf("%d sample(s) with a non-finite value or one beyond the metric's range at its resolution", len(invalid)), nowMs)})
	}
	if len(unknown) > 0 {
		out.invalid += len(unknown)
		out.list = append(out.list, output{kind: outDeadLetter, dl: deadLetter(b, unknown, "unknown_metric",
			fmt.Sprintf("%d sample(s) with a metric not in the catalogue", len(unknown)), nowMs)})
	}
	if accepted == 0 {
		return false
	}
	p.lastSeenMs = nowMs
	if loc := b.GetLocation(); loc != "" {
		p.location = loc
	}
	tr := alerting.Trigger{IngestTimeMs: ingest, EmittedTimeMs: nowMs}
	if !out.batched {
		defer e.finish(out)
	}
	e.win.Advance(p.win, out.features(e), p.tenant, p.id)
	e.emit(p, nowMs, tr, out)
	e.changeScores(p, tr, nowMs, out)
	if e.models != nil {
		e.models.change(e, p, nowMs, tr, out)
	}
	return true
}

// idleDue reports whether idle may change p at nowMs: it has windows or
// window state and has sent nothing for stream.windows.idle_timeout.
func (e *engine) idleDue(p *patient, nowMs int64) bool {
	return e.idleMs > 0 && !p.win.Empty() && nowMs-p.lastSeenMs >= e.idleMs
}

// idle runs the idle timeout on p at processing time nowMs: when p has
// sent nothing for stream.windows.idle_timeout, its open windows close
// (features and window-end scores are emitted) and its watermark then
// moves on with processing time, so that the state kept for late samples
// goes once allowed_lateness has passed too. It reports whether p changed.
func (e *engine) idle(p *patient, nowMs int64, out *outputs) bool {
	if !e.idleDue(p, nowMs) {
		return false
	}
	overdue := time.Duration(nowMs-p.lastSeenMs-e.idleMs) * time.Millisecond
	if !out.batched {
		defer e.finish(out)
	}
	moved := e.win.Idle(p.win, out.features(e), p.tenant, p.id, overdue)
	e.emit(p, nowMs, e.trigger(p, nowMs), out)
	return moved
}

// flush closes every open window of p (stream.windows.flush_on_shutdown)
// and reports whether p changed.
func (e *engine) flush(p *patient, nowMs int64, out *outputs) bool {
	wm := p.win.Watermark()
	if !out.batched {
		defer e.finish(out)
	}
	e.win.Flush(p.win, out.features(e), p.tenant, p.id)
	e.emit(p, nowMs, e.trigger(p, nowMs), out)
	return p.win.Watermark() != wm
}

// trigger is the alert trigger of scores made without an input batch: the
// newest ingest time among the patient's values.
func (e *engine) trigger(p *patient, nowMs int64) alerting.Trigger {
	tr := alerting.Trigger{EmittedTimeMs: nowMs}
	for _, v := range p.latest {
		tr.IngestTimeMs = max(tr.IngestTimeMs, v.ingestTimeMs)
	}
	return tr
}

// emit queues the windows the window engine just closed for p (their
// rows are in out's batch) as an outWindows placeholder, deciding now,
// while the tables' boundary times are as they are at this point of the
// input, which of them get which window-end scores: every first emission
// of a score window, for the tables that emitted no change score at its
// end.
func (e *engine) emit(p *patient, nowMs int64, tr alerting.Trigger, out *outputs) {
	b := out.features(e)
	ws := b.Windows()
	if len(ws) == out.seen {
		return
	}
	win0 := len(out.wins)
	for _, w := range ws[out.seen:] {
		// A correction changes the window's features, not the score
		// emitted at its end (it shares its deterministic id); a change
		// score at exactly this time may have been emitted already.
		due := w.Window == e.scoreWin && w.Version == 1
		var scores uint32
		if due {
			scores = e.dueScores(p, w.EndMs)
		}
		out.wins = append(out.wins, closedWindow{WindowRows: w, due: due, scores: scores})
	}
	out.seen = len(ws)
	b.Seal()
	out.list = append(out.list, output{kind: outWindows, key: p.key, pt: p, tr: tr, nowMs: nowMs, win0: win0, nwin: len(out.wins) - win0})
}

// finish turns the rows of out's batch into one Arrow record and
// replaces the placeholders of out.list, in order: each closed window
// goes to the features topic as a FeatureWindow (for batched outputs
// encoded straight from the record's rows into out's slab, else as a
// message), the newest values of a
// score window's metrics (read from the record's columns) become its
// patient's closed values, from which its window-end score is taken if
// due; every score, window-end or pending change score, runs the alert
// rules. The record is released before returning.
func (e *engine) finish(out *outputs) {
	if len(out.wins) == 0 && !slices.ContainsFunc(out.list[out.done:], func(o output) bool { return o.kind == outPendingScore }) {
		out.done = len(out.list)
		return
	}
	b := out.features(e)
	var cols window.Columns
	if b.Len() > 0 {
		rec := b.NewRecord()
		defer rec.Release()
		var err error
		if cols, err = window.ColumnsOf(rec); err != nil {
			// The record is the engine's own: its schema is window.Schema.
			panic(fmt.Sprintf("feature record: %v", err))
		}
	}
	if e.models != nil {
		e.models.prepare(e, out, &cols)
	}
	final := append(out.spare[:0], out.list[:out.done]...)
	row := 0
	for _, o := range out.list[out.done:] {
		switch o.kind {
		case outPendingScore:
			final = e.emitScore(final, o.pt, o.score, o.tr)
			continue
		case outWindows:
		default:
			final = append(final, o)
			continue
		}
		p := o.pt
		wins := out.wins[o.win0 : o.win0+o.nwin]
		n := 0
		for _, w := range wins {
			n += w.Rows
		}
		var fws []*vigilv1.FeatureWindow
		if !out.batched {
			fws = b.AppendProto(out.fws[:0], &cols, row, row+n, o.nowMs)
			if len(fws) != len(wins) {
				panic(fmt.Sprintf("feature record: %d windows in rows %d-%d, want %d", len(fws), row, row+n, len(wins)))
			}
		}
		for k, w := range wins {
			if out.batched {
				lo, hi := row, row+w.Rows
				v, _ := out.slab.put(func(b []byte) ([]byte, error) { return window.AppendWindowRows(b, &cols, lo, hi, o.nowMs), nil })
				final = append(final, output{kind: outFeatures, key: p.key, val: v})
			} else {
				final = append(final, output{kind: outFeatures, key: p.key, fw: fws[k]})
			}
			if w.Version > 1 {
				out.corrections++
			}
			if w.Window == e.scoreWin {
				for i := row; i < row+wins[k].Rows; i++ {
					if cols.DerivedMetric.Value(i) {
						continue
					}
					// (Interned: the record's buffers are reused once it
					// is released.)
					p.closed = setValue(p.closed, value{metric: b.Intern(cols.Metric.Value(i)), unit: b.Intern(cols.Unit.Value(i)),
						value: cols.Last.Value(i), timeMs: cols.LastTimeMs.Value(i)})
				}
				if w.due {
					final = e.windowEndScores(final, p, w.EndMs, w.scores, o.tr, o.nowMs)
					final = e.featureAlerts(final, p, &cols, row, row+wins[k].Rows, w.EndMs, o.tr)
					if e.models != nil {
						final = e.models.windowEnd(e, final, p, w.EndMs, o.tr, out)
					}
				}
				if w.Version == 1 {
					final = e.baselineWindow(final, p, &cols, row, row+wins[k].Rows, w.EndMs, o.tr, o.nowMs)
				}
			}
			row += wins[k].Rows
		}
		clear(fws)
		out.fws = fws[:0]
	}
	clear(out.list)
	out.list, out.spare = final, out.list[:0]
	out.wins, out.seen, out.done = out.wins[:0], 0, len(final)
}

// emitScore appends s and the alerts it raises for p to list.
func (e *engine) emitScore(list []output, p *patient, s *vigilv1.Score, tr alerting.Trigger) []output {
	list = append(list, output{kind: outScore, key: p.key, score: s})
	tr.Location, tr.Tenant, tr.Patient = p.location, p.tenant, p.id
	for _, ev := range e.alerts.Evaluate(&p.alerts, s, tr) {
		list = append(list, output{kind: outAlert, key: p.key, alert: ev})
	}
	return list
}

// deadLetter builds the dead letter of the samples at idx of b.
func deadLetter(b *vigilv1.SampleBatch, idx []int, reason, msg string, nowMs int64) *vigilv1.DeadLetter {
	fields := make([]string, len(idx))
	samples := make([]*vigilv1.Sample, len(idx))
	for i, j := range idx {
		fields[i] = "samples[" + strconv.Itoa(j) + "]"
		samples[i] = b.GetSamples()[j]
	}
	return &vigilv1.DeadLetter{
		SchemaVersion: 1, Reason: reason, Message: msg, Source: b.GetSource(), Origin: "stream",
		Field: strings.Join(fields, ","), RefusedTimeMs: nowMs,
		Tenant: b.GetTenant(), Patient: b.GetPatient(), Device: b.GetDevice(), MessageId: b.GetMessageId(),
		Batch: &vigilv1.SampleBatch{
			SchemaVersion: b.GetSchemaVersion(), Tenant: b.GetTenant(), Patient: b.GetPatient(), Device: b.GetDevice(),
			Source: b.GetSource(), IngestTimeMs: b.GetIngestTimeMs(), MessageId: b.GetMessageId(),
			Location: b.GetLocation(), Samples: samples,
		},
	}
}

// sourceName is the dead-letter key of a source: its lowercase name, as
// ingest/publish.SourceName (kept in step with it; not imported so that the
// stream stage does not depend on the ingest stage).
func sourceName(s vigilv1.Source) string {
	n, ok := vigilv1.Source_name[int32(s)]
	if !ok {
		return "unknown"
	}
	return strings.ToLower(strings.TrimPrefix(n, "SOURCE_"))
}

// encode marshals m deterministically (map order fixed), so that equal
// state and outputs give equal bytes.
func encode(m proto.Message) ([]byte, error) {
	return proto.MarshalOptions{Deterministic: true}.Marshal(m)
}

// stateSchema is the PatientState schema_version the engine writes: 2 is
// the pane-based window state (series, watermark, corrections).
const stateSchema = 2

// toProto renders p as its changelog value.
func (p *patient) toProto() *vigilv1.PatientState {
	ps := &vigilv1.PatientState{
		SchemaVersion: stateSchema,
		Tenant:        p.tenant,
		Patient:       p.id,
		Latest:        valuesProto(p.latest),
		ClosedLatest:  valuesProto(p.closed),
		LastSeenMs:    p.lastSeenMs,
	}
	p.scoresToProto(ps)
	p.eng.ToProto(p.win, ps)
	p.alerts.ToProto(ps)
	ps.Location = p.location
	ps.Baseline = p.base.toProto()
	ps.ModelInputs = p.mdl.toProto()
	return ps
}

func valuesProto(vs []value) []*vigilv1.LatestValue {
	out := make([]*vigilv1.LatestValue, len(vs))
	for i, v := range vs {
		out[i] = &vigilv1.LatestValue{Metric: v.metric, Value: v.value, Unit: v.unit, EventTimeMs: v.timeMs, IngestTimeMs: v.ingestTimeMs}
	}
	slices.SortFunc(out, func(a, b *vigilv1.LatestValue) int { return strings.Compare(a.Metric, b.Metric) })
	return out
}

// fromProto restores a patient from its changelog value.
func (e *engine) fromProto(key string, ps *vigilv1.PatientState) (*patient, error) {
	p := e.newPatient(key, ps.GetTenant(), ps.GetPatient())
	w, err := e.win.FromProto(ps)
	if err != nil {
		return nil, fmt.Errorf("restoring patient %s: %w", key, err)
	}
	p.win = w
	p.latest = valuesFromProto(ps.GetLatest())
	p.closed = valuesFromProto(ps.GetClosedLatest())
	p.alerts = alerting.FromProto(ps)
	p.location = ps.GetLocation()
	e.scoresFromProto(p, ps)
	p.lastSeenMs = ps.GetLastSeenMs()
	p.base = e.baselines.fromProto(ps.GetBaseline())
	p.mdl = modelsFromProto(ps.GetModelInputs())
	return p, nil
}

func valuesFromProto(ls []*vigilv1.LatestValue) []value {
	out := make([]value, len(ls))
	for i, l := range ls {
		out[i] = value{metric: l.GetMetric(), unit: l.GetUnit(), value: l.GetValue(), timeMs: l.GetEventTimeMs(), ingestTimeMs: l.GetIngestTimeMs()}
	}
	return out
}

// windowTimers is the session's side of the idle timeout and of the flush
// on shutdown (stream.windows.idle_timeout, flush_on_shutdown). Only the
// session's loop uses it.
type windowTimers struct {
	// next is when the owned patients are next checked for idleness.
	next time.Time
	// flushed: the shutdown flush ran.
	flushed bool
	// w produces the outputs (its buffers are reused).
	w *worker
}

// idleCheckEvery is how often (wall clock) the owned patients are checked
// for the idle timeout: a quarter of it, between 50 ms and 1 s. Whether a
// patient is idle is decided on the processor's clock.
func (p *Processor) idleCheckEvery() time.Duration {
	return min(max(p.cfg.Stream.Windows.IdleTimeout/4, 50*time.Millisecond), time.Second)
}

// idlePollDeadline returns when a poll between transactions must return
// for the next idle check; false when idle timeouts are off.
func (s *session) idlePollDeadline() (time.Time, bool) {
	if s.p.cfg.Stream.Windows.IdleTimeout <= 0 {
		return time.Time{}, false
	}
	if s.timers.next.IsZero() {
		s.timers.next = time.Now().Add(s.p.idleCheckEvery())
	}
	return s.timers.next, true
}

// expireIdle, when an idle check is due, closes the windows of every owned
// patient silent for stream.windows.idle_timeout (engine.idle). It runs
// between transactions, and what it closes commits in a transaction of its
// own that also writes every pending patient state: the outputs of an idle
// close and the state that emitted them must commit together, since no
// input record stands for the close in a restore's replay.
func (s *session) expireIdle() error {
	if t, ok := s.idlePollDeadline(); !ok || time.Now().Before(t) {
		return nil
	}
	s.timers.next = time.Now().Add(s.p.idleCheckEvery())
	return s.closeWindows(true)
}

// closeWindowsOnShutdown closes, once, every open window of every owned
// patient when stream.windows.flush_on_shutdown is set (engine.flush), in
// a last transaction. The loop calls it between transactions once Run's
// context is done.
func (s *session) closeWindowsOnShutdown() error {
	if !s.p.cfg.Stream.Windows.FlushOnShutdown || s.timers.flushed {
		return nil
	}
	s.timers.flushed = true
	return s.closeWindows(false)
}

// closeWindows runs engine.idle (idle) or engine.flush (shutdown) over the
// owned patients as a timer pass. It must be called between transactions.
func (s *session) closeWindows(idle bool) error {
	nowMs := s.p.clock.Now().UnixMilli()
	if idle {
		return s.timerPass("idle timeout", func(p *patient) bool { return s.p.eng.idleDue(p, nowMs) },
			func(p *patient, out *outputs) bool { return s.p.eng.idle(p, nowMs, out) })
	}
	return s.timerPass("shutdown", func(p *patient) bool { return !p.win.Empty() },
		func(p *patient, out *outputs) bool { return s.p.eng.flush(p, nowMs, out) })
}

// timerPass runs apply on every owned patient for which due holds, in
// partition then key order, with the session's timer worker, and, when a
// patient changed (apply says so, or it emitted outputs), produces the
// outputs in a new transaction and commits it with every pending state:
// no input record stands for a timer in a restore's replay, so its outputs
// and the state that emitted them must commit together. what names the
// pass in the debug log. It must be called between transactions.
func (s *session) timerPass(what string, due func(*patient) bool, apply func(*patient, *outputs) bool) error {
	if s.timers.w == nil {
		s.timers.w = &worker{s: s, out: outputs{batched: true}, nAlerts: map[vigilv1.AlertEventType]int{}, nDeadBy: map[string]int{}}
	}
	w := s.timers.w
	w.resetCounts()
	type dueEntry struct {
		part int32
		key  string
		ps   *partState
		e    *entry
	}
	var dues []dueEntry
	s.mu.Lock()
	for part, ps := range s.parts {
		if ps.next < 0 {
			continue // nothing processed or committed: no patient
		}
		for key, e := range ps.pats {
			if due(e.pt) {
				dues = append(dues, dueEntry{part, key, ps, e})
			}
		}
	}
	slices.SortFunc(dues, func(a, b dueEntry) int {
		if a.part != b.part {
			return int(a.part - b.part)
		}
		return strings.Compare(a.key, b.key)
	})
	changed := 0
	for _, d := range dues {
		n0 := len(w.out.list)
		if apply(d.e.pt, &w.out) || len(w.out.list) > n0 { // (outputs: its state changed)
			d.ps.markDirty(d.e, d.ps.next, time.Now())
			changed++
		}
		if w.out.finishDue() {
			s.p.eng.finish(&w.out)
		}
	}
	s.p.eng.finish(&w.out)
	s.mu.Unlock()
	if changed == 0 {
		return nil
	}
	if err := s.begin(); err != nil {
		return err
	}
	for _, o := range w.out.list {
		if err := w.produce(o); err != nil {
			return err
		}
	}
	clear(w.out.list)
	w.out.list = w.out.list[:0]
	s.nFeatures += w.nFeatures
	s.nScores += w.nScores
	for k, n := range w.nAlerts {
		s.nAlerts[k] += n
	}
	for k, n := range w.nDeadBy {
		s.nDeadBy[k] += n
	}
	s.p.log.Debug("timer pass", "what", what, "patients", changed, "features", w.nFeatures)
	return s.commit(true)
}
