package ews

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"slices"
	"strings"
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
	// not scored).
	Staleness time.Duration
	// Latest returns a metric's newest observation (at or before AtMs),
	// false when there is none. It is called a few times per parameter
	// during Score and never retained.
	Latest func(metric string) (Observation, bool)
	// Scales chooses a scale per parameter name; parameters not named use
	// their first scale.
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
		ins[i] = r.resolve(&r.Parameters[i], req)
		anyPresent = anyPresent || ins[i].present
	}
	if !anyPresent {
		return nil
	}
	s := &vigilv1.Score{
		SchemaVersion:  1,
		Tenant:         req.Tenant,
		Patient:        req.Patient,
		Kind:           KindNEWS2,
		Ruleset:        r.Name,
		RulesetVersion: r.Version,
		RulesetHash:    r.Hash,
		EventTimeMs:    req.AtMs,
		Components:     make([]*vigilv1.ScoreComponent, 0, len(r.Parameters)),
	}
	// One allocation for all components.
	comps := make([]vigilv1.ScoreComponent, len(r.Parameters))
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
			b, text, ok := r.band(p, req.Scales[p.Name], in.banded, ins)
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
	s.Value = total
	s.SingleParameterRed = maxPoints >= r.RedScore
	s.Band = r.response(total, maxPoints)
	s.TopContributors = topContributors(s.Components)
	s.Id = ScoreID(req.Tenant, req.Patient, KindNEWS2, req.AtMs, r.Hash)
	return s
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
		in := r.resolveInput(&r.Parameters[i], req, false)
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
			b, _, ok := r.band(p, req.Scales[p.Name], in.banded, ins)
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

// resolve finds a parameter's input.
func (r *Ruleset) resolve(p *Parameter, req Request) input {
	return r.resolveInput(p, req, true)
}

// resolveInput finds a parameter's input; names: name the metrics of a
// derived parameter none of whose inputs is present (which allocates).
func (r *Ruleset) resolveInput(p *Parameter, req Request, names bool) input {
	stale := func(o Observation) bool {
		return req.AtMs-o.TimeMs > req.Staleness.Milliseconds()
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
		return input{present: true, stale: stale(o), value: o.Value, banded: RoundHalfAway(o.Value, p.Decimals),
			metric: p.Metric, unit: unit, timeMs: o.TimeMs}
	}
	// Derived 0/1: the deciding input is the newest current one above its
	// threshold; else the newest current one; else the newest stale one.
	var above, current, old input
	for _, t := range p.AnyAbove {
		o, ok := req.Latest(t.Metric)
		if !ok {
			continue
		}
		unit := o.Unit
		if unit == "" {
			unit = t.Unit
		}
		in := input{present: true, value: o.Value, metric: t.Metric, unit: unit, timeMs: o.TimeMs}
		switch {
		case stale(o):
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
	metrics := make([]string, len(p.AnyAbove))
	for i, t := range p.AnyAbove {
		metrics[i] = t.Metric
	}
	return input{metric: strings.Join(metrics, ","), unit: p.Unit}
}

// band finds the band of value v in the chosen scale, given every
// parameter's input for conditions, and its text.
func (r *Ruleset) band(p *Parameter, scale string, v float64, ins []input) (Band, string, bool) {
	sc := &p.Scales[0]
	for i := range p.Scales {
		if p.Scales[i].Name == scale {
			sc = &p.Scales[i]
		}
	}
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
	scored := make([]*vigilv1.ScoreComponent, 0, len(cs))
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
