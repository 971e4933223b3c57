package stream

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/detectors/alerting"
	"github.com/vigilhealth/vigil/detectors/ews"
	"github.com/vigilhealth/vigil/internal/config"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// The early-warning scores of the engine (detectors.scores): every
// configured table (news2, mews, qsofa, or a site's file of one of those
// kinds) is scored at the same points, on change per input batch and at
// each score-window end, and each kind keeps its own last score, digest
// and boundary times per patient, so that each kind's series is emitted
// only on change, exactly as the single NEWS2 series was.

// maxScoreTables bounds the tables (closedWindow.scores is a bit set).
const maxScoreTables = 32

// scoreTable is one configured table with its per-input staleness limits.
// Immutable; shared by all patients.
type scoreTable struct {
	rs     *ews.Ruleset
	limits *ews.Limits
}

// kindScore is one patient's state of one table.
type kindScore struct {
	t *scoreTable
	// last is the newest emitted change score of the table (nil before
	// any), compacted to what change detection reads (ews.Compact: it is
	// written with every state checkpoint); digest its ews.Digest, which
	// the per-batch unchanged check reads.
	last   *vigilv1.Score
	digest ews.Digest
	// boundary are window-aligned event times above the watermark at
	// which a change score of this kind was emitted: the kind's
	// window-end score for such a time is not emitted again (it would
	// share its deterministic id).
	boundary []int64
}

// newScoreTables loads detectors.scores.tables: each kind's file from
// detectors.scores.files (news2: else stream.ruleset), else the embedded
// table; rs, when not nil (tests), is used for its kind instead of
// loading. It blocks on reading the files.
func newScoreTables(cfg config.Config, rs *ews.Ruleset) ([]scoreTable, error) {
	sc := cfg.Detectors.Scores
	if len(sc.Tables) > maxScoreTables {
		return nil, fmt.Errorf("detectors.scores.tables: %d tables, at most %d", len(sc.Tables), maxScoreTables)
	}
	if cfg.Stream.Ruleset != "" && sc.Files[ews.KindNEWS2] != "" {
		return nil, fmt.Errorf("detectors.scores.files.news2 and stream.ruleset are both set: set one")
	}
	tables := make([]scoreTable, 0, len(sc.Tables))
	for _, kind := range sc.Tables {
		r := rs
		if r == nil || r.Kind != kind {
			path := sc.Files[kind]
			if kind == ews.KindNEWS2 && path == "" {
				path = cfg.Stream.Ruleset
			}
			var err error
			if r, err = ews.LoadKind(kind, path); err != nil {
				return nil, fmt.Errorf("detectors.scores.tables: %w", err)
			}
		}
		tables = append(tables, scoreTable{rs: r, limits: r.Limits(func(parameter, metric string) time.Duration {
			return sc.Limit(parameter, metric, cfg.Stream.Staleness)
		})})
	}
	return tables, nil
}

// newKindScores makes a new patient's per-table state.
func (e *engine) newKindScores() []kindScore {
	ks := make([]kindScore, len(e.scores))
	for i := range ks {
		ks[i].t = &e.scores[i]
	}
	return ks
}

// noScores reports whether no table has emitted a score for p.
func (p *patient) noScores() bool {
	for i := range p.scores {
		if p.scores[i].last != nil {
			return false
		}
	}
	return true
}

// request is the scoring request of table t for p at atMs from latest.
func (p *patient) request(t *scoreTable, atMs int64, latest func(string) (ews.Observation, bool)) ews.Request {
	return ews.Request{Tenant: p.tenant, Patient: p.id, AtMs: atMs, Limits: t.limits, Latest: latest}
}

// changeScores runs after an input batch was applied to p: it forgets the
// boundary times the watermark passed and, for each table whose score the
// batch changed (Unchanged tells without building it, which is the common
// case), queues the new score as a pending output whose alert rules run
// in finish, after those of the window-end scores before it.
func (e *engine) changeScores(p *patient, tr alerting.Trigger, nowMs int64, out *outputs) {
	wm := p.win.Watermark()
	maxEvent := p.win.MaxEventTime()
	for i := range p.scores {
		ks := &p.scores[i]
		if len(ks.boundary) > 0 {
			ks.boundary = slices.DeleteFunc(ks.boundary, func(t int64) bool { return t <= wm })
		}
		req := p.request(ks.t, maxEvent, p.latestFn)
		if ks.t.rs.UnchangedDigest(&ks.digest, req) {
			continue
		}
		s := ks.t.rs.Score(req)
		if s == nil || !ews.Changed(ks.last, s) {
			continue
		}
		s.EmittedTimeMs = nowMs
		ks.last, ks.digest = ews.Compact(s), ks.t.rs.Digest(s)
		if maxEvent%e.scoreMs == 0 {
			ks.boundary = append(ks.boundary, maxEvent)
		}
		out.list = append(out.list, output{kind: outPendingScore, key: p.key, pt: p, score: s, tr: tr})
	}
}

// dueScores is the set (bit i: table i) of tables whose window-end score
// at endMs is due for p: those that emitted no change score at endMs.
func (e *engine) dueScores(p *patient, endMs int64) uint32 {
	var due uint32
	for i := range p.scores {
		if !slices.Contains(p.scores[i].boundary, endMs) {
			due |= 1 << i
		}
	}
	return due
}

// windowEndScores appends p's window-end scores at endMs of the tables in
// due, taken from the newest values of the closed windows, and the alerts
// they raise, to list. A window-end score is emitted whether or not it
// changed (it is the regular series); it does not become the table's last
// score, which only change scores set.
func (e *engine) windowEndScores(list []output, p *patient, endMs int64, due uint32, tr alerting.Trigger, nowMs int64) []output {
	for i := range p.scores {
		if due&(1<<i) == 0 {
			continue
		}
		t := p.scores[i].t
		if s := t.rs.Score(p.request(t, endMs, p.closedFn)); s != nil {
			s.EmittedTimeMs = nowMs
			list = e.emitScore(list, p, s, tr)
		}
	}
	return list
}

// scoresToProto writes p's per-table state into ps: the last score of
// each kind and each kind's boundary times (sorted by kind).
func (p *patient) scoresToProto(ps *vigilv1.PatientState) {
	for i := range p.scores {
		ks := &p.scores[i]
		kind := ks.t.rs.Kind
		if ks.last != nil {
			if ps.LastScores == nil {
				ps.LastScores = make(map[string]*vigilv1.Score, len(p.scores))
			}
			ps.LastScores[kind] = ks.last
		}
		if len(ks.boundary) > 0 {
			ps.ScoreBoundaryTimes = append(ps.ScoreBoundaryTimes, &vigilv1.ScoreBoundaryTimes{Kind: kind, TimesMs: slices.Clone(ks.boundary)})
		}
	}
	slices.SortFunc(ps.ScoreBoundaryTimes, func(a, b *vigilv1.ScoreBoundaryTimes) int { return strings.Compare(a.Kind, b.Kind) })
}

// scoresFromProto restores p's per-table state from ps. A state written
// before several tables ran holds news2's boundary times in
// boundary_score_times_ms. A last score made by another version of a
// table (its hash differs) is kept but matches no digest, so the next
// batch emits the new table's score.
func (e *engine) scoresFromProto(p *patient, ps *vigilv1.PatientState) {
	for i := range p.scores {
		ks := &p.scores[i]
		kind := ks.t.rs.Kind
		ks.last = ps.GetLastScores()[kind]
		ks.digest = ks.t.rs.Digest(ks.last)
		ks.boundary = nil
		for _, b := range ps.GetScoreBoundaryTimes() {
			if b.GetKind() == kind {
				ks.boundary = slices.Clone(b.GetTimesMs())
			}
		}
		if kind == ews.KindNEWS2 && len(ps.GetScoreBoundaryTimes()) == 0 && len(ps.GetBoundaryScoreTimesMs()) > 0 {
			ks.boundary = slices.Clone(ps.GetBoundaryScoreTimesMs())
		}
	}
}
