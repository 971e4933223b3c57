package window

import (
	"fmt"
	"math"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// ToProto writes p into ps (watermark_ms, series sorted by metric,
// corrections; panes = true). Restoring the result continues bit for bit.
// p must have no pending corrections (call Advance after every batch).
func (e *Engine) ToProto(p *Patient, ps *vigilv1.PatientState) {
	ps.Panes = true
	ps.WatermarkMs = p.wm
	ps.MaxEventTimeMs = p.maxEvent
	for i := range p.series {
		s := &p.series[i]
		ws := &vigilv1.WindowSeries{Metric: e.metrics[s.m].name}
		for j := range s.panes {
			pn := panePB(&s.panes[j], s.runs[s.panes[j].off:s.panes[j].off+uint32(s.panes[j].nr)])
			if s.x != nil && len(s.x.occ) > 0 {
				pn.Occupied = s.x.occ[j]
			}
			ws.Panes = append(ws.Panes, pn)
		}
		if s.x != nil {
			for _, t := range s.x.seq {
				ws.Sequence = append(ws.Sequence, &vigilv1.TimedValue{TimeMs: t.t, Key: t.k})
			}
			for k := range s.x.sess {
				ws.Sessions = append(ws.Sessions, panePB(&s.x.sess[k].acc, s.x.sess[k].runs))
			}
			d := &s.x.desat
			if d.started || len(d.pending) > 0 {
				ds := &vigilv1.DesatState{Started: d.started, PaneMs: d.paneMs, HasBaseline: d.hasBase, BaselineKey: d.baseline,
					InEvent: d.inEvent, EventStartMs: d.eventStart, EventLastMs: d.eventLastLow, Counted: d.counted}
				for _, t := range d.pending {
					ds.Pending = append(ds.Pending, &vigilv1.TimedValue{TimeMs: t.t, Key: t.k})
				}
				ws.Desaturation = ds
			}
		}
		ps.Series = append(ps.Series, ws)
	}
	for _, c := range p.corr {
		ps.Corrections = append(ps.Corrections, &vigilv1.WindowCorrection{Window: e.defs[c.def].name, EndMs: c.end, Version: c.version})
	}
}

func panePB(p *pane, runs []run) *vigilv1.WindowPane {
	pb := &vigilv1.WindowPane{StartMs: p.start, Count: p.n, FirstOffsetMs: p.first, LastOffsetMs: p.last, LastKey: p.lastK,
		SumK: p.sk, SumKk: p.skk, SumX: p.sx, SumXx: p.sxx, SumXy: p.sxy, DesatEvents: uint32(p.events),
		RunKeys: make([]int32, len(runs)), RunCounts: make([]uint32, len(runs))}
	for i, r := range runs {
		pb.RunKeys[i], pb.RunCounts[i] = r.k, r.c
	}
	return pb
}

// FromProto restores a patient written by ToProto. It fails on a state that
// names a metric or window the engine's spec does not have, or is
// inconsistent: a changelog written with another spec cannot be continued.
func (e *Engine) FromProto(ps *vigilv1.PatientState) (*Patient, error) {
	p := NewPatient()
	if !ps.GetPanes() {
		if len(ps.GetWindows()) > 0 {
			return nil, fmt.Errorf("restoring windows: state written by the schema-1 engine (open windows without panes) cannot be continued")
		}
		p.maxEvent = ps.GetMaxEventTimeMs()
		if p.maxEvent != noEvent {
			p.wm = p.maxEvent - e.oooMs
		}
		return p, nil
	}
	p.wm, p.maxEvent = ps.GetWatermarkMs(), ps.GetMaxEventTimeMs()
	if (p.wm != noEvent && !inTimeRange(p.wm)) || (p.maxEvent != noEvent && !inTimeRange(p.maxEvent)) {
		return nil, fmt.Errorf("restoring windows: watermark %d or newest event time %d out of range", p.wm, p.maxEvent)
	}
	for _, ws := range ps.GetSeries() {
		mi, ok := e.Metric(ws.GetMetric())
		if !ok {
			return nil, fmt.Errorf("restoring windows: metric %q is not in the window spec", ws.GetMetric())
		}
		m := &e.metrics[mi]
		s := p.seriesFor(mi, m.desat != nil || m.wearGapS > 0 || m.hrv || m.session >= 0)
		for _, pb := range ws.GetPanes() {
			pn, runs, err := paneFromPB(pb)
			if err == nil && (Start(pn.start, e.paneMs) != pn.start || pn.first < 0 || int64(pn.last) >= e.paneMs ||
				pn.first > pn.last || (len(s.panes) > 0 && s.panes[len(s.panes)-1].start >= pn.start)) {
				err = fmt.Errorf("pane at %d: not a %d ms pane after the previous one, or offsets %d..%d outside it", pn.start, e.paneMs, pn.first, pn.last)
			}
			if err != nil {
				return nil, fmt.Errorf("restoring windows of %s: %w", ws.GetMetric(), err)
			}
			pn.off = uint32(len(s.runs))
			s.runs = append(s.runs, runs...)
			s.panes = append(s.panes, pn)
			if m.wearGapS > 0 {
				s.x.occ = append(s.x.occ, pb.GetOccupied())
			}
		}
		if s.x == nil {
			continue
		}
		for _, t := range ws.GetSequence() {
			if !inTimeRange(t.GetTimeMs()) {
				return nil, fmt.Errorf("restoring windows of %s: sample time %d out of range", ws.GetMetric(), t.GetTimeMs())
			}
			s.x.seq = append(s.x.seq, timed{t.GetTimeMs(), t.GetKey()})
		}
		for _, pb := range ws.GetSessions() {
			pn, runs, err := paneFromPB(pb)
			if err == nil && (pn.first < 0 || pn.first > pn.last || m.session < 0) {
				err = fmt.Errorf("session at %d: offsets %d..%d, or the metric has no session window", pn.start, pn.first, pn.last)
			}
			if err != nil {
				return nil, fmt.Errorf("restoring session of %s: %w", ws.GetMetric(), err)
			}
			pn.off, pn.nr = 0, 0
			s.x.sess = append(s.x.sess, session{acc: pn, runs: runs})
		}
		if ds := ws.GetDesaturation(); ds != nil {
			d := &s.x.desat
			d.started, d.paneMs, d.hasBase, d.baseline = ds.GetStarted(), ds.GetPaneMs(), ds.GetHasBaseline(), ds.GetBaselineKey()
			d.inEvent, d.eventStart, d.eventLastLow, d.counted = ds.GetInEvent(), ds.GetEventStartMs(), ds.GetEventLastMs(), ds.GetCounted()
			for _, t := range ds.GetPending() {
				if !inTimeRange(t.GetTimeMs()) || m.desat == nil {
					return nil, fmt.Errorf("restoring desaturation of %s: sample time %d out of range, or no detector", ws.GetMetric(), t.GetTimeMs())
				}
				d.pending = append(d.pending, timed{t.GetTimeMs(), t.GetKey()})
			}
		}
	}
	p.sessEnd = math.MinInt64 + 1 // recomputed at the next boundary
	for _, c := range ps.GetCorrections() {
		di := -1
		for i := range e.defs {
			if e.defs[i].name == c.GetWindow() {
				di = i
			}
		}
		if di < 0 {
			return nil, fmt.Errorf("restoring windows: window %q is not in the window spec", c.GetWindow())
		}
		if !inTimeRange(c.GetEndMs()) {
			return nil, fmt.Errorf("restoring windows: correction end %d out of range", c.GetEndMs())
		}
		p.corr = append(p.corr, correction{def: uint8(di), end: c.GetEndMs(), version: c.GetVersion()})
	}
	return p, nil
}

// inTimeRange reports whether an event time (Unix ms) is one the engine
// takes: within ±2^50 ms (some 35,000 years) of the epoch, far from where
// window arithmetic would overflow.
func inTimeRange(t int64) bool { return t >= -maxTimeMs && t <= maxTimeMs }

const maxTimeMs = 1 << 50

func paneFromPB(pb *vigilv1.WindowPane) (pane, []run, error) {
	if len(pb.GetRunKeys()) != len(pb.GetRunCounts()) || len(pb.GetRunKeys()) > 65535 || pb.GetCount() == 0 || !inTimeRange(pb.GetStartMs()) {
		return pane{}, nil, fmt.Errorf("pane at %d: %d run keys, %d run counts, count %d", pb.GetStartMs(), len(pb.GetRunKeys()), len(pb.GetRunCounts()), pb.GetCount())
	}
	runs := make([]run, len(pb.GetRunKeys()))
	var n uint64
	for i := range runs {
		runs[i] = run{k: pb.GetRunKeys()[i], c: pb.GetRunCounts()[i]}
		n += uint64(runs[i].c)
		if i > 0 && runs[i].k <= runs[i-1].k {
			return pane{}, nil, fmt.Errorf("pane at %d: run keys not increasing", pb.GetStartMs())
		}
	}
	if n != uint64(pb.GetCount()) {
		return pane{}, nil, fmt.Errorf("pane at %d: runs hold %d samples, count is %d", pb.GetStartMs(), n, pb.GetCount())
	}
	return pane{start: pb.GetStartMs(), n: pb.GetCount(), first: pb.GetFirstOffsetMs(), last: pb.GetLastOffsetMs(),
		lastK: pb.GetLastKey(), sk: pb.GetSumK(), skk: pb.GetSumKk(), sx: pb.GetSumX(), sxx: pb.GetSumXx(), sxy: pb.GetSumXy(),
		nr: uint16(len(runs)), events: uint16(pb.GetDesatEvents())}, runs, nil
}
