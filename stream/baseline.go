package stream

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	"github.com/vigilhealth/vigil/detectors/alerting"
	"github.com/vigilhealth/vigil/detectors/baseline"
	"github.com/vigilhealth/vigil/detectors/ews"
	"github.com/vigilhealth/vigil/features/window"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/config"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Baseline scores: the engine feeds each closed score window's mean of
// every metric of detectors.baselines into the patient's baseline.Series
// and emits a Score of kind "baseline" when the patient's deviation band
// or a metric's drift state changed.
const (
	// KindBaseline is the Score kind of baseline scores.
	KindBaseline = "baseline"
	// baselineVersion is the version of the baseline algorithm (the
	// ruleset_version of its scores); the ruleset_hash covers the settings.
	baselineVersion = "1"
)

// baselines is the engine's compiled detectors.baselines: read only.
type baselines struct {
	metrics []string // sorted
	units   []string
	params  []baseline.Params
	hash    string
	// staleMs: a metric whose newest window is older than this before the
	// newest of the patient's baselines does not count in the band.
	staleMs int64
}

// newBaselines compiles cfg.Detectors.Baselines against the catalogue;
// nil when no metric is configured.
func newBaselines(cfg config.Config, cat *catalog.Catalog) (*baselines, error) {
	c := cfg.Detectors.Baselines
	if len(c.Metrics) == 0 {
		return nil, nil
	}
	if w := cfg.Stream.Window; w > 0 && c.Step/w > 255 {
		return nil, fmt.Errorf("detectors.baselines.step: %s holds more than 255 score windows of %s", c.Step, w)
	}
	b := &baselines{metrics: slices.Sorted(slices.Values(c.Metrics)), staleMs: c.Step.Milliseconds()}
	h := sha256.New()
	fmt.Fprintf(h, "baseline %s\n", baselineVersion)
	for _, m := range b.metrics {
		cm, ok := cat.Lookup(m)
		if !ok || cm.ID != m {
			return nil, fmt.Errorf("detectors.baselines.metrics: %q is not a catalogue metric id", m)
		}
		p := baseline.Params{Smooth: c.Smoothing, Span: c.Span, Step: c.Step, WarmUp: c.WarmUp, MADFloor: c.MADFloors[m],
			MediumZ: c.MediumZ, HighZ: c.HighZ, Hysteresis: c.Hysteresis,
			EWMALambda: c.EWMALambda, CUSUMK: c.CUSUMK, CUSUMH: c.CUSUMH, ReferenceDays: c.ReferenceDays, SDFloor: c.SDFloors[m]}
		if r, ok := c.References[m]; ok {
			p.Reference = baseline.Reference{Mean: r.Mean, SD: r.SD}
		}
		if err := p.Validate(); err != nil {
			return nil, fmt.Errorf("detectors.baselines (%s): %w", m, err)
		}
		b.units = append(b.units, cm.Unit)
		b.params = append(b.params, p)
		fmt.Fprintf(h, "%s %s %s\n", m, cm.Unit, p.Canonical())
	}
	b.hash = hex.EncodeToString(h.Sum(nil))
	return b, nil
}

// index returns the position of metric in b.metrics, or -1.
func (b *baselines) index(metric string) int {
	for i, m := range b.metrics {
		if m == metric {
			return i
		}
	}
	return -1
}

// patientBaselines is one patient's baselines: series[i] is of
// metrics[i], nil until its first value.
type patientBaselines struct {
	b       *baselines
	series  []*baseline.Series
	emitted baseline.Band
}

// baselineWindow feeds the rows lo..hi of cols (one closed score window
// of p, ending at endMs, first emitted) into p's baselines and appends to
// list the baseline score (and its alerts) when p's band or a drift state
// changed.
func (e *engine) baselineWindow(list []output, p *patient, cols *window.Columns, lo, hi int, endMs int64, tr alerting.Trigger, nowMs int64) []output {
	b := e.baselines
	if b == nil {
		return list
	}
	fed := false
	for i := lo; i < hi; i++ {
		if cols.DerivedMetric.Value(i) {
			continue
		}
		k := b.index(cols.Metric.Value(i))
		if k < 0 {
			continue
		}
		if p.base == nil {
			p.base = &patientBaselines{b: b, series: make([]*baseline.Series, len(b.metrics))}
		}
		s := p.base.series[k]
		if s == nil {
			s = baseline.NewSeries()
			p.base.series[k] = s
		}
		s.Add(&b.params[k], cols.StartMs.Value(i), cols.Mean.Value(i))
		fed = true
	}
	if !fed {
		return list
	}
	band, top := b.band(p.base)
	changed := band != p.base.emitted
	for _, s := range p.base.series {
		if s != nil && s.Drift().Direction != s.Emitted {
			changed = true
		}
	}
	if !changed {
		return list
	}
	p.base.emitted = band
	for _, s := range p.base.series {
		if s != nil {
			s.Emitted = s.Drift().Direction
		}
	}
	return e.emitScore(list, p, b.score(p, band, top, endMs, nowMs), tr)
}

// band is the patient's band: the highest band among the metrics whose
// baseline is ready and whose newest window is fresh; top is the index of
// the metric with the largest |z| among them (-1 if none).
func (b *baselines) band(pb *patientBaselines) (baseline.Band, int) {
	var newest int64 = math.MinInt64
	for _, s := range pb.series {
		if s != nil {
			_, at, _, _ := s.Deviation()
			newest = max(newest, at)
		}
	}
	band, top, topZ := baseline.BandWarmingUp, -1, -1.0
	for k, s := range pb.series {
		if s == nil {
			continue
		}
		_, at, z, bd := s.Deviation()
		if bd == baseline.BandWarmingUp || at < newest-b.staleMs {
			continue
		}
		band = max(band, bd)
		if math.Abs(z) > topZ {
			top, topZ = k, math.Abs(z)
		}
	}
	return band, top
}

// score builds p's baseline score at endMs.
func (b *baselines) score(p *patient, band baseline.Band, top int, endMs, nowMs int64) *vigilv1.Score {
	s := &vigilv1.Score{
		SchemaVersion: 1, Tenant: p.tenant, Patient: p.id, Kind: KindBaseline, Band: band.String(),
		Ruleset: KindBaseline, RulesetVersion: baselineVersion, RulesetHash: b.hash,
		EventTimeMs: endMs, EmittedTimeMs: nowMs,
	}
	var newest int64 = math.MinInt64
	for _, sr := range p.base.series {
		if sr != nil {
			_, at, _, _ := sr.Deviation()
			newest = max(newest, at)
		}
	}
	type contrib struct {
		metric string
		z      float64
	}
	var contribs []contrib
	for k, sr := range p.base.series {
		if sr == nil {
			continue
		}
		m := b.metrics[k]
		x, at, z, bd := sr.Deviation()
		med, mad, _ := sr.Baseline()
		stale := at < newest-b.staleMs
		c := &vigilv1.ScoreComponent{Parameter: m, Metric: m, InputValue: x, InputUnit: b.units[k], InputTimeMs: at,
			Points: z, Band: bd.String(), Missing: bd == baseline.BandWarmingUp, Stale: stale,
			BaselineMedian: med, BaselineMad: mad}
		s.Components = append(s.Components, c)
		switch {
		case c.Missing:
			s.Missing = append(s.Missing, m)
		case stale:
			s.Stale = append(s.Stale, m)
		case bd > baseline.BandLow:
			contribs = append(contribs, contrib{m, math.Abs(z)})
		}
		if d := sr.DriftDetail(); d.Ready {
			dr := sr.Drift()
			s.BaselineDrifts = append(s.BaselineDrifts, &vigilv1.BaselineDrift{
				Metric: m, Direction: dr.Direction.String(), SinceMs: dr.SinceMs, DetectedMs: dr.DetectedMs,
				Ewma: d.EWMA, CusumUp: d.Up, CusumDown: d.Down, ReferenceMean: d.ReferenceMean, ReferenceSd: d.ReferenceSD,
				LastDailyMean: d.LastDailyMean, Days: uint32(d.Days),
			})
			if dr.Direction != baseline.NoDrift {
				contribs = append(contribs, contrib{m, 0})
			}
		}
	}
	if top >= 0 {
		_, _, s.Value, _ = p.base.series[top].Deviation()
	}
	slices.SortStableFunc(contribs, func(a, b contrib) int { return cmp.Compare(b.z, a.z) })
	for _, c := range contribs {
		if !slices.Contains(s.TopContributors, c.metric) {
			s.TopContributors = append(s.TopContributors, c.metric)
		}
	}
	var drift strings.Builder
	for _, d := range s.BaselineDrifts {
		drift.WriteString(d.Metric + ":" + d.Direction + ":" + strconv.FormatInt(d.SinceMs, 10) + ";")
	}
	s.Id = ews.HashID("score", p.tenant, p.id, KindBaseline, strconv.FormatInt(endMs, 10), b.hash, s.Band, drift.String())
	return s
}

// toProto renders pb (nil: no baselines) for the changelog.
func (pb *patientBaselines) toProto() *vigilv1.BaselineState {
	if pb == nil {
		return nil
	}
	b := pb.b
	st := &vigilv1.BaselineState{EmittedBand: pb.emitted.String()}
	for k, s := range pb.series {
		if s != nil {
			st.Series = append(st.Series, s.ToProto(b.metrics[k]))
		}
	}
	return st
}

// fromProto restores a patient's baselines; the series of metrics no
// longer configured are dropped.
func (b *baselines) fromProto(st *vigilv1.BaselineState) *patientBaselines {
	if b == nil || st == nil {
		return nil
	}
	pb := &patientBaselines{b: b, series: make([]*baseline.Series, len(b.metrics))}
	for _, band := range []baseline.Band{baseline.BandLow, baseline.BandMedium, baseline.BandHigh} {
		if st.GetEmittedBand() == band.String() {
			pb.emitted = band
		}
	}
	for _, ss := range st.GetSeries() {
		k := b.index(ss.GetMetric())
		if k < 0 {
			continue
		}
		// A series written under another bucket layout (span or step
		// changed) cannot continue: it starts again.
		if s, err := baseline.FromProto(&b.params[k], ss); err == nil {
			pb.series[k] = s
		}
	}
	return pb
}
