package baseline

import (
	"fmt"
	"slices"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// ToProto renders s (of metric) as its changelog message. The result owns
// copies of s's buffers.
func (s *Series) ToProto(metric string) *vigilv1.BaselineSeries {
	return &vigilv1.BaselineSeries{
		Metric: metric, BucketMedians: slices.Clone(s.med), BucketCounts: slices.Clone(s.cnt),
		OpenBucket: s.openIdx, OpenValues: slices.Clone(s.open), Started: s.started,
		Recent: recentProto(s), LastValue: s.last, LastTimeMs: s.lastMs, Z: s.z, Band: int32(s.band),
		Day: s.day, DaySum: s.daySum, DayCount: s.dayN,
		ReferenceCount: s.refN, ReferenceMean: s.refMean, ReferenceM2: s.refM2, ReferenceSd: s.refSD, ReferenceReady: s.refReady,
		Ewma: s.ewma, CusumUp: s.up, CusumDown: s.down, CusumUpStartMs: s.upStartMs, CusumDownStartMs: s.downStart,
		LastDailyMean: s.lastDaily, Days: s.days,
		DriftDirection: int32(s.drift.Direction), DriftSinceMs: s.drift.SinceMs, DriftDetectedMs: s.drift.DetectedMs,
		EmittedDirection: int32(s.Emitted),
	}
}

// FromProto restores a series written by ToProto under params p; the
// baseline median and MAD are recomputed from the buckets (deterministic,
// so the restored series continues exactly).
func FromProto(p *Params, m *vigilv1.BaselineSeries) (*Series, error) {
	nb := p.buckets()
	if n := len(m.GetBucketMedians()); n != 0 && (n != nb || len(m.GetBucketCounts()) != nb) {
		return nil, fmt.Errorf("baseline of %s: %d buckets (%d counts), the settings make %d", m.GetMetric(), n, len(m.GetBucketCounts()), nb)
	}
	if len(m.GetOpenValues()) > maxOpen {
		return nil, fmt.Errorf("baseline of %s: %d open values, at most %d", m.GetMetric(), len(m.GetOpenValues()), maxOpen)
	}
	if len(m.GetRecent()) > MaxSmooth {
		return nil, fmt.Errorf("baseline of %s: %d recent values, at most %d", m.GetMetric(), len(m.GetRecent()), MaxSmooth)
	}
	s := &Series{
		openIdx: m.GetOpenBucket(), started: m.GetStarted(),
		last: m.GetLastValue(), lastMs: m.GetLastTimeMs(), z: m.GetZ(), band: Band(m.GetBand()),
		day: m.GetDay(), daySum: m.GetDaySum(), dayN: m.GetDayCount(),
		refN: m.GetReferenceCount(), refMean: m.GetReferenceMean(), refM2: m.GetReferenceM2(), refSD: m.GetReferenceSd(), refReady: m.GetReferenceReady(),
		ewma: m.GetEwma(), up: m.GetCusumUp(), down: m.GetCusumDown(), upStartMs: m.GetCusumUpStartMs(), downStart: m.GetCusumDownStartMs(),
		lastDaily: m.GetLastDailyMean(), days: m.GetDays(),
		drift:   Drift{Direction: Direction(m.GetDriftDirection()), SinceMs: m.GetDriftSinceMs(), DetectedMs: m.GetDriftDetectedMs()},
		Emitted: Direction(m.GetEmittedDirection()),
	}
	if len(m.GetBucketMedians()) > 0 {
		s.med, s.cnt = slices.Clone(m.GetBucketMedians()), slices.Clone(m.GetBucketCounts())
	}
	if len(m.GetOpenValues()) > 0 {
		s.open = slices.Clone(m.GetOpenValues())
	}
	for _, v := range m.GetRecent() {
		s.recent[s.irecent] = v
		s.irecent = (s.irecent + 1) % MaxSmooth
		s.nrecent++
	}
	s.recompute()
	return s, nil
}

// recentProto lists the recent values oldest first.
func recentProto(s *Series) []float32 {
	out := make([]float32, s.nrecent)
	for i := range out {
		out[i] = s.recent[(int(s.irecent)-int(s.nrecent)+i+2*MaxSmooth)%MaxSmooth]
	}
	return out
}
