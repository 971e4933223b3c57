package ews

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"slices"
	"time"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Observation is the newest value of one metric of a patient.
type Observation struct {
	Value float64
	Unit  string
	// TimeMs is the event time, Unix ms.
	TimeMs int64
}

// Request is what a score is computed from.
type Request struct {
	Tenant, Patient string
	// AtMs is the event time the score describes, Unix ms.
	AtMs int64
	// Staleness: an input older than this before AtMs is stale (listed,
	// not scored), unless Limits is set.
	Staleness time.Duration
	// Limits, when made by this table's Limits, gives each input its own
	// staleness limit instead of Staleness.
	Limits *Limits
	// Latest returns a metric's newest observation (at or before AtMs),
	// false when there is none. It is called a few times per parameter
	// during Score and never retained.
	Latest func(metric string) (Observation, bool)
	// Scales chooses a scale per parameter name, overriding the scales'
	// select flags; parameters not named use the scale their select flag
	// chooses, else their first.
	Scales map[string]string
}

// input is one parameter's resolved input.
type input struct {
	present, stale bool
	value          float64 // raw input value
	banded         float64 // value banded: rounded, or the derived 0/1
	metric, unit   string
	timeMs         int64
}

// Score computes the score described by req. Missing and stale inputs score
// 0 and are listed in Score.missing / Score.stale. The returned Score has a
// deterministic id; EmittedTimeMs is left for the caller. It returns nil
// when every parameter is missing (nothing to score).
func (r *Ruleset) Score(req Request) *vigilv1.Score {
	var buf [16]input
	var ins []input
	if len(r.Parameters) > len(buf) {
		ins = make([]input, len(r.Parameters))
	} else {
		ins = buf[:len(r.Parameters)]
	}
	anyPresent := false
	for i := range r.Parameters {
		ins[i] = r.resolve(i, req)
		anyPresent = anyPresent || ins[i].present
	}
	if !anyPresent {
		return nil
	}
	// The score, its components and the missing and stale names (which
	// share one array, each capped to its half) in one allocation for
	// tables of up to 8 parameters: a stream scores several tables at
	// every window end.
	n := len(r.Parameters)
	var (
		s     *vigilv1.Score
		comps []vigilv1.ScoreComponent
		ptrs  []*vigilv1.ScoreComponent
		names []string
	)
	switch {
	case n <= len(smallScoreBlock{}.comps):
		blk := new(smallScoreBlock)
		s, comps, ptrs, names = &blk.s, blk.comps[:n], blk.ptrs[:0:n], blk.names[:2*n]
	case n <= len(scoreBlock{}.comps):
		blk := new(scoreBlock)
		s, comps, ptrs, names = &blk.s, blk.comps[:n], blk.ptrs[:0:n], blk.names[:2*n]
	default:
		s, comps, ptrs, names = new(vigilv1.Score), make([]vigilv1.ScoreComponent, n), make([]*vigilv1.ScoreComponent, 0, n), make([]string, 2*n)
	}
	s.SchemaVersion, s.Tenant, s.Patient, s.Kind = 1, req.Tenant, req.Patient, r.Kind
	s.Ruleset, s.RulesetVersion, s.RulesetHash, s.EventTimeMs = r.Name, r.Version, r.Hash, req.AtMs
	s.Components = ptrs
	s.Missing, s.Stale = names[:0:n], names[n:n]
	var total, maxPoints float64
	for i := range r.Parameters {
		p := &r.Parameters[i]
		in := ins[i]
		c := &comps[i]
		c.Parameter, c.Metric, c.InputValue, c.InputUnit, c.InputTimeMs = p.Name, in.metric, in.value, in.unit, in.timeMs
		switch {
		case !in.present:
			c.Missing = true
			s.Missing = append(s.Missing, p.Name)
		case in.stale:
			c.Stale = true
			s.Stale = append(s.Stale, p.Name)
		default:
			b, text, ok := r.band(p, req, in.banded, ins)
			if !ok {
				// Only possible for conditional bands whose condition's
				// input is missing or stale: the parameter cannot be
				// scored, which is reported as missing.
				c.Missing = true
				c.Band = "unscorable: condition input missing"
				s.Missing = append(s.Missing, p.Name)
				break
			}
			c.Points = b.Points
			c.Band = text
			total += b.Points
			maxPoints = max(maxPoints, b.Points)
		}
		s.Components = append(s.Components, c)
	}
	if len(s.Missing) == 0 {
		s.Missing = nil
	}
	if len(s.Stale) == 0 {
		s.Stale = nil
	}
	s.Value = total
	s.SingleParameterRed = r.RedScore > 0 && maxPoints >= r.RedScore
	s.Band = r.response(total, maxPoints)
	s.TopContributors = topContributors(s.Components)
	s.Id = ScoreID(req.Tenant, req.Patient, r.Kind, req.AtMs, r.Hash)
	return s
}

// smallScoreBlock and scoreBlock hold a Score of up to 4 or 8 parameters
// with its parts, so that Score allocates them at once.
type smallScoreBlock struct {
	s     vigilv1.Score
	comps [4]vigilv1.ScoreComponent
	ptrs  [4]*vigilv1.ScoreComponent
	names [8]string
}

type scoreBlock struct {
	s     vigilv1.Score
	comps [8]vigilv1.ScoreComponent
	ptrs  [8]*vigilv1.ScoreComponent
	names [16]string
}

// Unchanged reports whether Score(req) would return a score that Changed
// does not tell from prev (prev and it both non-nil), without building it:
// it resolves and bands the inputs as Score does but allocates nothing for
// rulesets of up to 16 parameters. A caller that emits a score only when it
// changed calls it first and builds the score only when it returns false.
// Safe for concurrent use, like Score.
func (r *Ruleset) Unchanged(prev *vigilv1.Score, req Request) bool {
	if prev == nil || prev.GetRulesetHash() != r.Hash || len(prev.GetComponents()) != len(r.Parameters) {
		return false
	}
	cs := prev.GetComponents()
	return r.unchanged(req, prev.GetValue(), prev.GetBand(), func(i int, p *Parameter, points float64, missing, stale bool) bool {
		c := cs[i]
		return c.GetParameter() == p.Name && c.GetPoints() == points && c.GetMissing() == missing && c.GetStale() == stale
	})
}

// Digest is a compact copy of what Unchanged compares of a score (its
// total, band and each component's points and flags) in one small
// allocation, so that a caller keeping a score per patient can ask
// UnchangedDigest without reaching into the score's many messages. The
// zero value matches no request. A Digest is immutable once made: safe
// for concurrent reads.
type Digest struct {
	r     *Ruleset
	value float64
	band  string
	comps []digestComp
}

type digestComp struct {
	points         float64
	missing, stale bool
}

// Digest returns the digest of s, a score of r (the zero Digest when s is
// nil or not a score of r's parameters).
func (r *Ruleset) Digest(s *vigilv1.Score) Digest {
	if s == nil || s.GetRulesetHash() != r.Hash || len(s.GetComponents()) != len(r.Parameters) {
		return Digest{}
	}
	d := Digest{r: r, value: s.GetValue(), band: s.GetBand(), comps: make([]digestComp, len(r.Parameters))}
	for i, c := range s.GetComponents() {
		if c.GetParameter() != r.Parameters[i].Name {
			return Digest{}
		}
		d.comps[i] = digestComp{points: c.GetPoints(), missing: c.GetMissing(), stale: c.GetStale()}
	}
	return d
}

// UnchangedDigest is Unchanged(prev, req) for d = r.Digest(prev): the same
// answer, without reading prev.
func (r *Ruleset) UnchangedDigest(d *Digest, req Request) bool {
	if d.r != r {
		return false
	}
	cs := d.comps
	return r.unchanged(req, d.value, d.band, func(i int, _ *Parameter, points float64, missing, stale bool) bool {
		c := &cs[i]
		return c.points == points && c.missing == missing && c.stale == stale
	})
}

// unchanged resolves and bands req's inputs as Score does and reports
// whether every component matches (same(i, parameter, points, missing,
// stale)) and the total and band are value and band.
func (r *Ruleset) unchanged(req Request, value float64, band string, same func(i int, p *Parameter, points float64, missing, stale bool) bool) bool {
	var buf [16]input
	ins := buf[:0]
	if len(r.Parameters) > len(buf) {
		ins = make([]input, 0, len(r.Parameters))
	}
	anyPresent := false
	for i := range r.Parameters {
		in := r.resolveInput(i, req, false)
		ins = append(ins, in)
		anyPresent = anyPresent || in.present
	}
	if !anyPresent {
		return false // Score returns nil
	}
	var total, maxPoints float64
	for i := range r.Parameters {
		p := &r.Parameters[i]
		in := ins[i]
		var points float64
		missing, stale := false, false
		switch {
		case !in.present:
			missing = true
		case in.stale:
			stale = true
		default:
			b, _, ok := r.band(p, req, in.banded, ins)
			if !ok {
				missing = true
				break
			}
			points = b.Points
			total += b.Points
			maxPoints = max(maxPoints, b.Points)
		}
		if !same(i, p, points, missing, stale) {
			return false
		}
	}
	return value == total && band == r.response(total, maxPoints)
}

// resolve finds parameter i's input.
func (r *Ruleset) resolve(i int, req Request) input {
	return r.resolveInput(i, req, true)
}

// resolveInput finds parameter i's input; names: name the metrics of a
// derived parameter none of whose inputs is present (which allocates).
func (r *Ruleset) resolveInput(i int, req Request, names bool) input {
	p := &r.Parameters[i]
	limits := req.Limits
	if limits != nil && limits.r != r {
		limits = nil
	}
	if p.Metric != "" {
		o, ok := req.Latest(p.Metric)
		if !ok {
			return input{metric: p.Metric, unit: p.Unit}
		}
		unit := o.Unit
		if unit == "" {
			unit = p.Unit
		}
		limit := req.Staleness.Milliseconds()
		if limits != nil {
			limit = limits.param[i]
		}
		return input{present: true, stale: req.AtMs-o.TimeMs > limit, value: o.Value, banded: RoundHalfAway(o.Value, p.Decimals),
			metric: p.Metric, unit: unit, timeMs: o.TimeMs}
	}
	// Derived 0/1: the deciding input is the newest current one above its
	// threshold; else the newest current one; else the newest stale one.
	var above, current, old input
	for j, t := range p.AnyAbove {
		o, ok := req.Latest(t.Metric)
		if !ok {
			continue
		}
		unit := o.Unit
		if unit == "" {
			unit = t.Unit
		}
		in := input{present: true, value: o.Value, metric: t.Metric, unit: unit, timeMs: o.TimeMs}
		limit := req.Staleness.Milliseconds()
		if limits != nil {
			limit = limits.anyAbove[i][j]
		}
		switch {
		case req.AtMs-o.TimeMs > limit:
			in.stale = true
			if !old.present || in.timeMs > old.timeMs {
				old = in
			}
		case o.Value > t.Above:
			in.banded = 1
			if !above.present || in.timeMs > above.timeMs {
				above = in
			}
		default:
			if !current.present || in.timeMs > current.timeMs {
				current = in
			}
		}
	}
	switch {
	case above.present:
		return above
	case current.present:
		return current
	case old.present:
		return old
	case !names:
		return input{unit: p.Unit}
	}
	return input{metric: p.anyMetrics, unit: p.Unit}
}

// scale is the scale of p that req selects: the one req.Scales names,
// else the first whose select flag matches the patient's newest value of
// its metric (of any age), else the first.
func (r *Ruleset) scale(p *Parameter, req Request) *Scale {
	if len(p.Scales) == 1 {
		return &p.Scales[0]
	}
	if name, ok := req.Scales[p.Name]; ok {
		for i := range p.Scales {
			if p.Scales[i].Name == name {
				return &p.Scales[i]
			}
		}
	}
	for i := 1; i < len(p.Scales); i++ {
		sel := p.Scales[i].Select
		if o, ok := req.Latest(sel.Metric); ok && RoundHalfAway(o.Value, 0) == sel.Value {
			return &p.Scales[i]
		}
	}
	return &p.Scales[0]
}

// band finds the band of value v in the scale req selects, given every
// parameter's input for conditions, and its text.
func (r *Ruleset) band(p *Parameter, req Request, v float64, ins []input) (Band, string, bool) {
	sc := r.scale(p, req)
	for k, b := range sc.Bands {
		if (b.Min != nil && v < *b.Min) || (b.Max != nil && v > *b.Max) {
			continue
		}
		if b.When != nil {
			ci := r.byName[b.When.Parameter]
			if !ins[ci].present || ins[ci].stale || ins[ci].banded != b.When.Value {
				continue
			}
		}
		if k < len(sc.texts) {
			return b, sc.texts[k], true
		}
		return b, BandText(b, p.Decimals), true
	}
	return Band{}, "", false
}

// response names the clinical-response band.
func (r *Ruleset) response(total, maxPoints float64) string {
	for _, c := range r.ClinicalResponse {
		if c.AggregateMin != nil && total < *c.AggregateMin {
			continue
		}
		if c.SingleParameterMin != nil && maxPoints < *c.SingleParameterMin {
			continue
		}
		return c.Band
	}
	return r.ClinicalResponse[len(r.ClinicalResponse)-1].Band // unreachable: validated
}

// topContributors lists the parameters that scored, most points first
// (ties in chart order).
func topContributors(cs []*vigilv1.ScoreComponent) []string {
	var buf [16]*vigilv1.ScoreComponent
	scored := buf[:0]
	for _, c := range cs {
		if c.Points > 0 {
			scored = append(scored, c)
		}
	}
	slices.SortStableFunc(scored, func(a, b *vigilv1.ScoreComponent) int { return cmp.Compare(b.Points, a.Points) })
	out := make([]string, len(scored))
	for i, c := range scored {
		out[i] = c.Parameter
	}
	return out
}

// Changed reports whether next differs from prev in what a reader of the
// score series cares about: value, band, or any component's points,
// missing or stale flag. A nil prev always differs. Input values that stay
// in their band are not a change.
func Changed(prev, next *vigilv1.Score) bool {
	if prev == nil || next == nil {
		return prev != next
	}
	if prev.GetValue() != next.GetValue() || prev.GetBand() != next.GetBand() ||
		prev.GetRulesetHash() != next.GetRulesetHash() || len(prev.GetComponents()) != len(next.GetComponents()) {
		return true
	}
	for i, a := range prev.GetComponents() {
		b := next.GetComponents()[i]
		if a.GetParameter() != b.GetParameter() || a.GetPoints() != b.GetPoints() ||
			a.GetMissing() != b.GetMissing() || a.GetStale() != b.GetStale() {
			return true
		}
	}
	return false
}

// ScoreID is the deterministic id of a score: a hash of tenant, patient,
// kind, event time and ruleset hash (32 hex digits).
func ScoreID(tenant, patient, kind string, eventTimeMs int64, rulesetHash string) string {
	return HashID("score", tenant, patient, kind, strconvInt(eventTimeMs), rulesetHash)
}

// HashID hashes length-prefixed parts with sha256 and returns the first 16
// bytes in hex: a deterministic id that no concatenation ambiguity can
// collide.
func HashID(parts ...string) string {
	h := sha256.New()
	var n [binary.MaxVarintLen64]byte
	for _, p := range parts {
		h.Write(n[:binary.PutUvarint(n[:], uint64(len(p)))])
		h.Write([]byte(p))
	}
	var sum [sha256.Size]byte
	return hex.EncodeToString(h.Sum(sum[:0])[:16])
}

func strconvInt(v int64) string {
	var b [20]byte
	return string(binary.BigEndian.AppendUint64(b[:0], uint64(v)))
}

// Compact returns the part of s that Changed, Unchanged and Digest read
// (kind, ruleset hash, event time, value, band, single-parameter flag and
// each component's parameter, points, missing and stale flags) in one
// allocation for scores of up to 8 components: what a caller keeps per
// patient (and writes to its state) to emit scores only on change, at a
// fraction of the full score's size. Nil for a nil s.
func Compact(s *vigilv1.Score) *vigilv1.Score {
	if s == nil {
		return nil
	}
	n := len(s.GetComponents())
	var (
		c     *vigilv1.Score
		comps []vigilv1.ScoreComponent
		ptrs  []*vigilv1.ScoreComponent
	)
	if n <= len(scoreBlock{}.comps) {
		blk := new(compactBlock)
		c, comps, ptrs = &blk.s, blk.comps[:n], blk.ptrs[:n]
	} else {
		c, comps, ptrs = new(vigilv1.Score), make([]vigilv1.ScoreComponent, n), make([]*vigilv1.ScoreComponent, n)
	}
	c.SchemaVersion, c.Kind, c.RulesetHash, c.EventTimeMs = s.GetSchemaVersion(), s.GetKind(), s.GetRulesetHash(), s.GetEventTimeMs()
	c.Value, c.Band, c.SingleParameterRed = s.GetValue(), s.GetBand(), s.GetSingleParameterRed()
	for i, sc := range s.GetComponents() {
		comps[i].Parameter, comps[i].Points, comps[i].Missing, comps[i].Stale = sc.GetParameter(), sc.GetPoints(), sc.GetMissing(), sc.GetStale()
		ptrs[i] = &comps[i]
	}
	if n > 0 {
		c.Components = ptrs
	}
	return c
}

// compactBlock holds a Compact score of up to 8 components.
type compactBlock struct {
	s     vigilv1.Score
	comps [8]vigilv1.ScoreComponent
	ptrs  [8]*vigilv1.ScoreComponent
}
