// Package ews computes early-warning scores from a patient's latest vital
// signs with versioned scoring tables. Three tables are embedded: the
// National Early Warning Score 2 (Royal College of Physicians, 2017;
// news2-rcp-2017.yaml), the Modified Early Warning Score of Subbe et al.
// (QJM 2001; mews-subbe-2001.yaml) and the quick SOFA of Sepsis-3 (Singer
// et al., JAMA 2016; qsofa-sepsis3-2016.yaml). Each chart is data: a
// versioned YAML table embedded in the binary or loaded from a file a site
// writes (internal/datafile: decoded strictly), validated (every scale's
// bands must cover the whole number line at the chart's resolution without
// gaps or overlaps), and identified by the sha256 of its bytes, which
// every Score carries with the table's name and version. The score kind
// (Score.kind: news2, mews, qsofa) comes from the file.
//
// A Ruleset is immutable after loading and safe for concurrent use.
package ews

import (
	_ "embed"
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/vigilhealth/vigil/internal/datafile"
)

// Score kinds of the embedded tables.
const (
	KindNEWS2 = "news2"
	KindMEWS  = "mews"
	KindQSOFA = "qsofa"
)

//go:embed news2-rcp-2017.yaml
var embedded []byte

//go:embed mews-subbe-2001.yaml
var embeddedMEWS []byte

//go:embed qsofa-sepsis3-2016.yaml
var embeddedQSOFA []byte

// Kinds are the kinds of the embedded tables, in the order the stream
// engine scores them.
func Kinds() []string { return []string{KindNEWS2, KindMEWS, KindQSOFA} }

// embeddedTable returns the embedded document of kind.
func embeddedTable(kind string) ([]byte, bool) {
	switch kind {
	case KindNEWS2:
		return embedded, true
	case KindMEWS:
		return embeddedMEWS, true
	case KindQSOFA:
		return embeddedQSOFA, true
	}
	return nil, false
}

// Ruleset is a loaded scoring table.
type Ruleset struct {
	// Kind is the Score.kind of its scores (news2, mews, qsofa).
	Kind string
	// Name and Version come from the file; Hash is the sha256 (hex) of the
	// file's bytes.
	Name    string
	Version string
	Source  string
	Hash    string
	// RedScore is the points of a single parameter that make a "red score"
	// (Score.single_parameter_red); 0 when the table has no such rule.
	RedScore         float64
	Parameters       []Parameter
	ClinicalResponse []Response

	byName map[string]int
}

// Parameter is one row group of the chart.
type Parameter struct {
	Name    string `yaml:"name"`
	Display string `yaml:"display"`
	// Metric is the catalogue metric whose latest value is the input.
	// Exactly one of Metric and AnyAbove is set.
	Metric string `yaml:"metric"`
	// Unit is the unit the bands are written in (the metric's canonical
	// unit).
	Unit string `yaml:"unit"`
	// AnyAbove derives a 0/1 input: 1 when any current (present, not
	// stale) input is above its threshold, 0 when current inputs exist and
	// none is.
	AnyAbove []Threshold `yaml:"any_above"`
	// Decimals is the chart's resolution: inputs are rounded to this many
	// decimals (half away from zero) before banding.
	Decimals int `yaml:"decimals"`
	// Scales are alternative charts; the first is the default.
	Scales []Scale `yaml:"scales"`
	// anyMetrics names the AnyAbove metrics ("fio2,oxygen_flow"), made
	// once by Parse: the metric of the component when none is present.
	anyMetrics string
}

// Threshold is one input of a derived parameter.
type Threshold struct {
	Metric string  `yaml:"metric"`
	Unit   string  `yaml:"unit"`
	Above  float64 `yaml:"above"`
}

// Scale is one chart of a parameter.
type Scale struct {
	Name    string `yaml:"name"`
	Display string `yaml:"display"`
	// Select, on a scale other than the first, chooses it for a patient
	// whose newest value of Select.Metric (whatever its age: a per-patient
	// flag such as NEWS2's SpO2 scale 2 target, never stale), rounded to a
	// whole number, is Select.Value. The first scale is used otherwise.
	Select *Selector `yaml:"select"`
	Bands  []Band    `yaml:"bands"`
	// texts are the BandTexts of Bands, made once by Parse (Score would
	// otherwise format them for every component of every score).
	texts []string
}

// Selector is the per-patient flag that selects a scale.
type Selector struct {
	Metric string  `yaml:"metric"`
	Value  float64 `yaml:"value"`
}

// Band is one cell: inclusive edges at the parameter's resolution, the
// points it scores, its text, and an optional condition.
type Band struct {
	Min    *float64 `yaml:"min"`
	Max    *float64 `yaml:"max"`
	Points float64  `yaml:"points"`
	// Text names the band; empty derives it from the edges ("21-24",
	// "<=8", ">=25").
	Text string     `yaml:"text"`
	When *Condition `yaml:"when"`
}

// Condition restricts a band to when another parameter's rounded input
// equals Value (e.g. SpO2 scale 2's rows for patients on oxygen).
type Condition struct {
	Parameter string  `yaml:"parameter"`
	Value     float64 `yaml:"value"`
}

// Response is one row of the clinical-response table: the first row whose
// conditions hold names the band. A row without conditions always holds.
type Response struct {
	Band string `yaml:"band"`
	// AggregateMin holds when the aggregate score is at least this.
	AggregateMin *float64 `yaml:"aggregate_min"`
	// SingleParameterMin holds when some parameter scores at least this.
	SingleParameterMin *float64 `yaml:"single_parameter_min"`
}

type fileDoc struct {
	Kind             string      `yaml:"kind"`
	Name             string      `yaml:"name"`
	Version          string      `yaml:"version"`
	Source           string      `yaml:"source"`
	RedScore         float64     `yaml:"red_score"`
	Parameters       []Parameter `yaml:"parameters"`
	ClinicalResponse []Response  `yaml:"clinical_response"`
}

// Default returns the embedded NEWS2 table (RCP 2017).
func Default() *Ruleset { return Embedded(KindNEWS2) }

// Embedded returns the embedded table of kind (one of Kinds()); it panics
// for another kind.
func Embedded(kind string) *Ruleset {
	doc, ok := embeddedTable(kind)
	if !ok {
		panic(fmt.Sprintf("no embedded scoring table of kind %q", kind))
	}
	r, err := Parse(doc)
	if err != nil {
		// The embedded files are tested; failing here is a build defect.
		panic(fmt.Sprintf("embedded %s table is invalid: %v", kind, err))
	}
	return r
}

// Load returns the NEWS2 table in the file at path, or the embedded one
// when path is empty.
func Load(path string) (*Ruleset, error) { return LoadKind(KindNEWS2, path) }

// LoadKind returns the table in the file at path, which must be of kind,
// or the embedded table of kind when path is empty. It blocks on reading
// the file.
func LoadKind(kind, path string) (*Ruleset, error) {
	doc, ok := embeddedTable(kind)
	if !ok && path == "" {
		return nil, fmt.Errorf("no embedded scoring table of kind %q: name a file", kind)
	}
	f, err := datafile.Read(path, doc)
	if err != nil {
		return nil, fmt.Errorf("reading %s scoring table: %w", kind, err)
	}
	r, err := Parse(f.Bytes)
	if err == nil && r.Kind != kind {
		err = fmt.Errorf("kind is %q, want %q", r.Kind, kind)
	}
	if err != nil {
		if path != "" {
			return nil, fmt.Errorf("%s scoring table %s: %w", kind, path, err)
		}
		return nil, fmt.Errorf("embedded %s scoring table: %w", kind, err)
	}
	return r, nil
}

// Parse decodes (strictly: unknown keys fail) and validates a table
// document.
func Parse(doc []byte) (*Ruleset, error) {
	var f fileDoc
	if err := datafile.Decode(doc, &f); err != nil {
		return nil, fmt.Errorf("decoding scoring table: %w", err)
	}
	r := &Ruleset{
		Kind: f.Kind, Name: f.Name, Version: f.Version, Source: f.Source, Hash: datafile.Hash(doc),
		RedScore: f.RedScore, Parameters: f.Parameters, ClinicalResponse: f.ClinicalResponse,
		byName: make(map[string]int, len(f.Parameters)),
	}
	if err := r.validate(); err != nil {
		return nil, err
	}
	for i := range r.Parameters {
		p := &r.Parameters[i]
		for j, t := range p.AnyAbove {
			if j > 0 {
				p.anyMetrics += ","
			}
			p.anyMetrics += t.Metric
		}
		for j := range p.Scales {
			sc := &p.Scales[j]
			sc.texts = make([]string, len(sc.Bands))
			for k, b := range sc.Bands {
				sc.texts[k] = BandText(b, p.Decimals)
				if j > 0 {
					// Name the chart a band of another scale comes from.
					name := sc.Display
					if name == "" {
						name = sc.Name
					}
					sc.texts[k] = name + ": " + sc.texts[k]
				}
			}
		}
	}
	return r, nil
}

func (r *Ruleset) validate() error {
	switch {
	case !validKind(r.Kind):
		return fmt.Errorf("kind %q must be a lowercase word (a-z, 0-9, _), e.g. news2, mews, qsofa", r.Kind)
	case r.Name == "":
		return errors.New("name is empty")
	case r.Version == "":
		return errors.New("version is empty")
	case r.RedScore < 0 || math.IsNaN(r.RedScore) || math.IsInf(r.RedScore, 0):
		return errors.New("red_score must be 0 (no single-parameter rule) or positive")
	case len(r.Parameters) == 0:
		return errors.New("no parameters")
	}
	for i := range r.Parameters {
		p := &r.Parameters[i]
		if p.Name == "" {
			return fmt.Errorf("parameters[%d]: name is empty", i)
		}
		if _, dup := r.byName[p.Name]; dup {
			return fmt.Errorf("parameters[%d] (%s): duplicate name", i, p.Name)
		}
		r.byName[p.Name] = i
	}
	for i := range r.Parameters {
		if err := r.validateParameter(&r.Parameters[i]); err != nil {
			return fmt.Errorf("parameters[%d] (%s): %w", i, r.Parameters[i].Name, err)
		}
	}
	if len(r.ClinicalResponse) == 0 {
		return errors.New("clinical_response is empty")
	}
	for i, c := range r.ClinicalResponse {
		if c.Band == "" {
			return fmt.Errorf("clinical_response[%d]: band is empty", i)
		}
	}
	last := r.ClinicalResponse[len(r.ClinicalResponse)-1]
	if last.SingleParameterMin != nil || (last.AggregateMin != nil && *last.AggregateMin > 0) {
		return errors.New("clinical_response: the last row must hold for every score (no single_parameter_min, aggregate_min at most 0)")
	}
	return nil
}

func (r *Ruleset) validateParameter(p *Parameter) error {
	if (p.Metric == "") == (len(p.AnyAbove) == 0) {
		return errors.New("exactly one of metric and any_above must be set")
	}
	for j, t := range p.AnyAbove {
		if t.Metric == "" {
			return fmt.Errorf("any_above[%d]: metric is empty", j)
		}
	}
	if p.Decimals < 0 || p.Decimals > 6 {
		return fmt.Errorf("decimals %d is not in [0, 6]", p.Decimals)
	}
	if len(p.Scales) == 0 {
		return errors.New("no scales")
	}
	seen := map[string]bool{}
	for j := range p.Scales {
		s := &p.Scales[j]
		if s.Name == "" || seen[s.Name] {
			return fmt.Errorf("scales[%d]: name %q is empty or repeated", j, s.Name)
		}
		seen[s.Name] = true
		if (j == 0) != (s.Select == nil) {
			return fmt.Errorf("scales[%d] (%s): every scale but the first (the default) needs select, the first has none", j, s.Name)
		}
		if s.Select != nil && (s.Select.Metric == "" || RoundHalfAway(s.Select.Value, 0) != s.Select.Value) {
			return fmt.Errorf("scales[%d] (%s): select needs a metric and a whole-number value", j, s.Name)
		}
		if err := r.validateScale(p, s); err != nil {
			return fmt.Errorf("scale %s: %w", s.Name, err)
		}
	}
	return nil
}

// validateScale checks that, for every condition the bands mention (and
// for none), the bands that apply cover the number line at the parameter's
// resolution exactly once.
func (r *Ruleset) validateScale(p *Parameter, s *Scale) error {
	if len(s.Bands) == 0 {
		return errors.New("no bands")
	}
	var conds []Condition
	for k, b := range s.Bands {
		if b.Min != nil && b.Max != nil && *b.Min > *b.Max {
			return fmt.Errorf("bands[%d]: min %g above max %g", k, *b.Min, *b.Max)
		}
		for _, e := range []*float64{b.Min, b.Max} {
			if e != nil && RoundHalfAway(*e, p.Decimals) != *e {
				return fmt.Errorf("bands[%d]: edge %g is finer than %d decimals", k, *e, p.Decimals)
			}
		}
		if b.When != nil {
			i, ok := r.byName[b.When.Parameter]
			if !ok || b.When.Parameter == p.Name {
				return fmt.Errorf("bands[%d]: when names unknown parameter %q", k, b.When.Parameter)
			}
			for _, os := range r.Parameters[i].Scales {
				for _, ob := range os.Bands {
					if ob.When != nil {
						return fmt.Errorf("bands[%d]: when names %s, which is itself conditional", k, b.When.Parameter)
					}
				}
			}
			if !containsCond(conds, *b.When) {
				conds = append(conds, *b.When)
			}
		}
	}
	if len(conds) == 0 {
		return checkCover(p, s.Bands, nil)
	}
	for _, c := range conds {
		if err := checkCover(p, s.Bands, &c); err != nil {
			return fmt.Errorf("when %s = %g: %w", c.Parameter, c.Value, err)
		}
	}
	return nil
}

func containsCond(cs []Condition, c Condition) bool {
	for _, x := range cs {
		if x == c {
			return true
		}
	}
	return false
}

// checkCover checks the bands applying under cond cover the line exactly
// once at the parameter's resolution.
func checkCover(p *Parameter, bands []Band, cond *Condition) error {
	var use []Band
	for _, b := range bands {
		if b.When == nil || (cond != nil && *b.When == *cond) {
			use = append(use, b)
		}
	}
	lower := func(b Band) float64 {
		if b.Min == nil {
			return math.Inf(-1)
		}
		return *b.Min
	}
	// Insertion sort by lower edge: a handful of bands.
	for i := 1; i < len(use); i++ {
		for j := i; j > 0 && lower(use[j]) < lower(use[j-1]); j-- {
			use[j], use[j-1] = use[j-1], use[j]
		}
	}
	if use[0].Min != nil {
		return fmt.Errorf("nothing covers values below %g", *use[0].Min)
	}
	step := math.Pow10(-p.Decimals)
	for i := 1; i < len(use); i++ {
		prev, cur := use[i-1], use[i]
		if prev.Max == nil {
			return fmt.Errorf("band %s is open above but %s follows it", BandText(prev, p.Decimals), BandText(cur, p.Decimals))
		}
		if want := RoundHalfAway(*prev.Max+step, p.Decimals); cur.Min == nil || *cur.Min != want {
			return fmt.Errorf("band %s must start at %s to follow %s without gap or overlap",
				BandText(cur, p.Decimals), strconv.FormatFloat(want, 'f', p.Decimals, 64), BandText(prev, p.Decimals))
		}
	}
	if last := use[len(use)-1]; last.Max != nil {
		return fmt.Errorf("nothing covers values above %g", *last.Max)
	}
	return nil
}

// validKind: a non-empty lowercase word.
func validKind(k string) bool {
	if k == "" || len(k) > 32 {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// Limits are per-input staleness limits compiled for one table: an input
// older than its limit before the score's time is stale (listed, not
// scored). Immutable once made; safe for concurrent use.
type Limits struct {
	r *Ruleset
	// param[i] is the limit (ms) of parameter i's metric; anyAbove[i][j]
	// that of its j-th derived input.
	param    []int64
	anyAbove [][]int64
}

// Limits compiles staleness limits for r: limit(parameter, metric) is the
// limit of metric as the input of parameter (for derived parameters,
// called once per input metric).
func (r *Ruleset) Limits(limit func(parameter, metric string) time.Duration) *Limits {
	l := &Limits{r: r, param: make([]int64, len(r.Parameters)), anyAbove: make([][]int64, len(r.Parameters))}
	for i := range r.Parameters {
		p := &r.Parameters[i]
		if p.Metric != "" {
			l.param[i] = limit(p.Name, p.Metric).Milliseconds()
		}
		for _, t := range p.AnyAbove {
			l.anyAbove[i] = append(l.anyAbove[i], limit(p.Name, t.Metric).Milliseconds())
		}
	}
	return l
}

// BandText is the band's text, or one derived from its edges at the given
// resolution ("21-24", "<=8", ">=25", "35.1-36.0").
func BandText(b Band, decimals int) string {
	if b.Text != "" {
		return b.Text
	}
	f := func(v float64) string { return strconv.FormatFloat(v, 'f', decimals, 64) }
	switch {
	case b.Min == nil && b.Max == nil:
		return "any"
	case b.Min == nil:
		return "<=" + f(*b.Max)
	case b.Max == nil:
		return ">=" + f(*b.Min)
	case *b.Min == *b.Max:
		return f(*b.Min)
	default:
		return f(*b.Min) + "-" + f(*b.Max)
	}
}

// Parameter returns the named parameter.
func (r *Ruleset) Parameter(name string) (*Parameter, bool) {
	i, ok := r.byName[name]
	if !ok {
		return nil, false
	}
	return &r.Parameters[i], true
}

// RoundHalfAway rounds v to the given number of decimals, halves away from
// zero, working on v's shortest decimal representation (the digits a person
// typed: 36.05 rounds to 36.1 although the nearest binary double is a hair
// below 36.05). Non-finite values are returned unchanged.
func RoundHalfAway(v float64, decimals int) float64 {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return v
	}
	// Fast path (most vital signs are charted at their resolution): when
	// v is the double nearest n / 10^decimals for a whole n, that decimal
	// round-trips to v, so v's shortest representation has at most
	// `decimals` decimals and v is returned unchanged, as below.
	if decimals >= 0 && decimals <= 15 {
		p := math.Pow10(decimals)
		if n := math.Round(v * p); math.Abs(n) < 1<<53 && n/p == v {
			return v
		}
	}
	return roundDecimal(v, decimals)
}

// roundDecimal is RoundHalfAway on the decimal digits of v's shortest
// representation, without the fast path.
func roundDecimal(v float64, decimals int) float64 {
	s := strconv.FormatFloat(v, 'f', -1, 64)
	neg := s[0] == '-'
	if neg {
		s = s[1:]
	}
	dot := -1
	for i := 0; i < len(s); i++ {
		if s[i] == '.' {
			dot = i
			break
		}
	}
	if dot < 0 || len(s)-dot-1 <= decimals {
		return v // already at (or coarser than) the resolution
	}
	up := s[dot+1+decimals] >= '5'
	// Digits kept, without the point: integer part and `decimals` digits.
	digits := []byte(s[:dot] + s[dot+1:dot+1+decimals])
	if up {
		i := len(digits) - 1
		for ; i >= 0; i-- {
			if digits[i] == '9' {
				digits[i] = '0'
				continue
			}
			digits[i]++
			break
		}
		if i < 0 {
			digits = append([]byte{'1'}, digits...)
		}
	}
	intLen := len(digits) - decimals
	out := make([]byte, 0, len(digits)+2)
	if neg {
		out = append(out, '-')
	}
	out = append(out, digits[:intLen]...)
	if decimals > 0 {
		out = append(out, '.')
		out = append(out, digits[intLen:]...)
	}
	r, err := strconv.ParseFloat(string(out), 64)
	if err != nil {
		// Unreachable: out is a well-formed decimal built above.
		return v
	}
	return r
}
