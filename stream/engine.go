package stream

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/detectors/alerting"
	"github.com/vigilhealth/vigil/detectors/news2"
	"github.com/vigilhealth/vigil/features/window"
	"github.com/vigilhealth/vigil/internal/catalog"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// noEvent is the max event time of a patient that has none yet.
const noEvent = math.MinInt64

// engine is the per-patient processing, free of Kafka: given a patient's
// state and one input batch it updates the state and appends the outputs.
// It is deterministic: the same state and batch give the same state and
// outputs, except the emitted/refused processing times. It holds no
// mutable state of its own and is safe for concurrent use on different
// patients.
type engine struct {
	sizeMs    int64
	oooMs     int64
	staleness time.Duration
	ruleset   *news2.Ruleset
	alerts    *alerting.Evaluator
	catalog   *catalog.Catalog
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
	key            string
	tenant, id     string
	maxEvent       int64
	windows        *window.Set
	latest         []value // one entry per metric, unordered
	closed         []value // newest values among closed windows
	alerts         alerting.State
	lastScore      *vigilv1.Score
	boundaryScores []int64
	lastSeenMs     int64
}

func (e *engine) newPatient(key, tenant, id string) *patient {
	return &patient{key: key, tenant: tenant, id: id, maxEvent: noEvent, windows: window.NewSet(time.Duration(e.sizeMs) * time.Millisecond)}
}

// empty reports whether the patient holds no state worth keeping.
func (p *patient) empty() bool {
	return p.windows.Len() == 0 && len(p.latest) == 0 && len(p.closed) == 0 && p.alerts.Empty() && p.lastScore == nil
}

func (p *patient) watermark(oooMs int64) int64 {
	if p.maxEvent == noEvent {
		return noEvent
	}
	return p.maxEvent - oooMs
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

func lookup(vs []value) func(string) (news2.Observation, bool) {
	return func(metric string) (news2.Observation, bool) {
		for i := range vs {
			if vs[i].metric == metric {
				return news2.Observation{Value: vs[i].value, Unit: vs[i].unit, TimeMs: vs[i].timeMs}, true
			}
		}
		return news2.Observation{}, false
	}
}

// outKind names an output topic.
type outKind uint8

const (
	outFeatures outKind = iota
	outScore
	outAlert
	outDeadLetter
)

// output is one record to produce, keyed by the patient (or, for dead
// letters, by source name).
type output struct {
	kind  outKind
	key   string
	dl    *vigilv1.DeadLetter
	fw    *vigilv1.FeatureWindow
	score *vigilv1.Score
	alert *vigilv1.AlertEvent
}

// outputs collects what one transaction produces; reused between
// transactions.
type outputs struct {
	list []output
	// txn-local counts, added to the metrics on commit.
	samples, late, invalid int
}

func (o *outputs) reset() {
	clear(o.list)
	o.list = o.list[:0]
	o.samples, o.late, o.invalid = 0, 0, 0
}

// apply processes one input batch for patient p: samples into windows and
// latest values (samples whose window already closed go to a "too_late"
// dead letter), windows closed by the new watermark emitted as features and
// window-end scores, and a score emitted when the batch changed it; every
// emitted score runs the alert rules. It reports whether p changed.
func (e *engine) apply(p *patient, b *vigilv1.SampleBatch, nowMs int64, out *outputs) bool {
	wm := p.watermark(e.oooMs)
	ingest := b.GetIngestTimeMs()
	var late, invalid, unknown []int
	accepted := 0
	batchMax := int64(noEvent)
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
		if p.maxEvent != noEvent && window.Start(t, e.sizeMs)+e.sizeMs <= wm {
			late = append(late, i)
			continue
		}
		unit := s.GetUnit()
		if unit == "" {
			unit = m.Unit
		}
		p.windows.Add(m.ID, unit, t, v)
		p.latest = setValue(p.latest, value{metric: m.ID, unit: unit, value: v, timeMs: t, ingestTimeMs: ingest})
		batchMax = max(batchMax, t)
		accepted++
	}
	if len(late) > 0 {
		out.late += len(late)
		out.list = append(out.list, output{kind: outDeadLetter, dl: deadLetter(b, late, "too_late",
			fmt.Sprintf("%d sample(s) fall in windows already closed: the patient's watermark is %d (newest event time %d minus out_of_orderness %d ms)",
				len(late), wm, p.maxEvent, e.oooMs), nowMs)})
	}
	if len(invalid) > 0 {
		out.invalid += len(invalid)
		out.list = append(out.list, output{kind: outDeadLetter, dl: deadLetter(b, invalid, "out_of_range",
			fmt.Sprintf("%d sample(s) with a non-finite value", len(invalid)), nowMs)})
	}
	if len(unknown) > 0 {
		out.invalid += len(unknown)
		out.list = append(out.list, output{kind: outDeadLetter, dl: deadLetter(b, unknown, "unknown_metric",
			fmt.Sprintf("%d sample(s) with a metric not in the catalogue", len(unknown)), nowMs)})
	}
	if accepted == 0 {
		return false
	}
	p.maxEvent = max(p.maxEvent, batchMax)
	p.lastSeenMs = nowMs
	tr := alerting.Trigger{IngestTimeMs: ingest, EmittedTimeMs: nowMs}
	wm = p.watermark(e.oooMs)

	p.windows.Close(wm, func(start, end int64, aggs []window.Agg) {
		fw := &vigilv1.FeatureWindow{
			SchemaVersion: 1, Tenant: p.tenant, Patient: p.id, Kind: vigilv1.WindowKind_WINDOW_KIND_TUMBLING,
			SizeMs: e.sizeMs, StepMs: e.sizeMs, StartMs: start, EndMs: end, Version: 1,
			Features: make([]*vigilv1.Feature, len(aggs)), EmittedTimeMs: nowMs, WatermarkMs: wm,
		}
		for i := range aggs {
			a := &aggs[i]
			var expected time.Duration
			if m, ok := e.catalog.Lookup(a.Metric); ok {
				expected = time.Duration(m.ExpectedIntervalS * float64(time.Second))
			}
			fw.Features[i] = a.Feature(expected)
			p.closed = setValue(p.closed, value{metric: a.Metric, unit: a.Unit, value: a.Last, timeMs: a.LastTime})
		}
		out.list = append(out.list, output{kind: outFeatures, key: p.key, fw: fw})
		if slices.Contains(p.boundaryScores, end) {
			return // a change score at exactly this time was emitted already
		}
		if s := e.score(p, end, p.closed, nowMs); s != nil {
			e.emitScore(p, s, tr, out)
		}
	})
	p.boundaryScores = slices.DeleteFunc(p.boundaryScores, func(t int64) bool { return t <= wm })

	if s := e.score(p, p.maxEvent, p.latest, nowMs); s != nil && news2.Changed(p.lastScore, s) {
		p.lastScore = s
		if p.maxEvent%e.sizeMs == 0 {
			p.boundaryScores = append(p.boundaryScores, p.maxEvent)
		}
		e.emitScore(p, s, tr, out)
	}
	return true
}

func (e *engine) score(p *patient, atMs int64, vs []value, nowMs int64) *vigilv1.Score {
	s := e.ruleset.Score(news2.Request{Tenant: p.tenant, Patient: p.id, AtMs: atMs, Staleness: e.staleness, Latest: lookup(vs)})
	if s != nil {
		s.EmittedTimeMs = nowMs
	}
	return s
}

func (e *engine) emitScore(p *patient, s *vigilv1.Score, tr alerting.Trigger, out *outputs) {
	out.list = append(out.list, output{kind: outScore, key: p.key, score: s})
	for _, ev := range e.alerts.Evaluate(&p.alerts, s, tr) {
		out.list = append(out.list, output{kind: outAlert, key: p.key, alert: ev})
	}
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

// toProto renders p as its changelog value.
func (p *patient) toProto() *vigilv1.PatientState {
	ps := &vigilv1.PatientState{
		SchemaVersion:        1,
		Tenant:               p.tenant,
		Patient:              p.id,
		MaxEventTimeMs:       p.maxEvent,
		Windows:              p.windows.AppendProto(nil),
		Latest:               valuesProto(p.latest),
		ClosedLatest:         valuesProto(p.closed),
		LastSeenMs:           p.lastSeenMs,
		BoundaryScoreTimesMs: slices.Clone(p.boundaryScores),
	}
	p.alerts.ToProto(ps)
	if p.lastScore != nil {
		ps.LastScores = map[string]*vigilv1.Score{news2.Kind: p.lastScore}
	}
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
	p.maxEvent = ps.GetMaxEventTimeMs()
	if err := p.windows.Restore(ps.GetWindows()); err != nil {
		return nil, fmt.Errorf("restoring patient %s: %w", key, err)
	}
	p.latest = valuesFromProto(ps.GetLatest())
	p.closed = valuesFromProto(ps.GetClosedLatest())
	p.alerts = alerting.FromProto(ps)
	p.lastScore = ps.GetLastScores()[news2.Kind]
	p.boundaryScores = slices.Clone(ps.GetBoundaryScoreTimesMs())
	p.lastSeenMs = ps.GetLastSeenMs()
	return p, nil
}

func valuesFromProto(ls []*vigilv1.LatestValue) []value {
	out := make([]value, len(ls))
	for i, l := range ls {
		out[i] = value{metric: l.GetMetric(), unit: l.GetUnit(), value: l.GetValue(), timeMs: l.GetEventTimeMs(), ingestTimeMs: l.GetIngestTimeMs()}
	}
	return out
}
