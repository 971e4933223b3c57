// Package ews computes early-warning scores from a patient's latest vital
// signs with versioned scoring tables, starting with the National Early
// Warning Score 2 (Royal College of Physicians, 2017). Each chart is data: a
// versioned YAML ruleset embedded in the binary (news2-rcp-2017.yaml) or
// loaded from a file, decoded strictly, validated (every scale's bands must
// cover the whole number line at the chart's resolution without gaps or
// overlaps), and identified by the sha256 of its bytes, which every Score
// carries.
//
// A Ruleset is immutable after loading and safe for concurrent use.
package ews

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"

	"gopkg.in/yaml.v3"
)

// KindNEWS2 is the Score.kind of NEWS2 scores.
const KindNEWS2 = "news2"

//go:embed news2-rcp-2017.yaml
var embedded []byte

// Ruleset is a loaded NEWS2 chart.
type Ruleset struct {
	// Name and Version come from the file; Hash is the sha256 (hex) of the
	// file's bytes.
	Name    string
	Version string
	Source  string
	Hash    string
	// RedScore is the points of a single parameter that make a "red score".
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
	Bands   []Band `yaml:"bands"`
	// texts are the BandTexts of Bands, made once by Parse (Score would
	// otherwise format them for every component of every score).
	texts []string
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
	Name             string      `yaml:"name"`
	Version          string      `yaml:"version"`
	Source           string      `yaml:"source"`
	RedScore         float64     `yaml:"red_score"`
	Parameters       []Parameter `yaml:"parameters"`
	ClinicalResponse []Response  `yaml:"clinical_response"`
}

// Default returns the embedded RCP 2017 ruleset.
func Default() *Ruleset {
	r, err := Parse(embedded)
	if err != nil {
		// The embedded file is tested; failing here is a build defect.
		panic(fmt.Sprintf("embedded NEWS2 ruleset is invalid: %v", err))
	}
	return r
}

// Load returns the ruleset in the file at path, or the embedded one when
// path is empty.
func Load(path string) (*Ruleset, error) {
	if path == "" {
		return Parse(embedded)
	}
	doc, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading NEWS2 ruleset: %w", err)
	}
	r, err := Parse(doc)
	if err != nil {
		return nil, fmt.Errorf("NEWS2 ruleset %s: %w", path, err)
	}
	return r, nil
}

// Parse decodes (strictly: unknown keys fail) and validates a ruleset
// document.
func Parse(doc []byte) (*Ruleset, error) {
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	dec.KnownFields(true)
	var f fileDoc
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("decoding NEWS2 ruleset: %w", err)
	}
	sum := sha256.Sum256(doc)
	r := &Ruleset{
		Name: f.Name, Version: f.Version, Source: f.Source, Hash: hex.EncodeToString(sum[:]),
		RedScore: f.RedScore, Parameters: f.Parameters, ClinicalResponse: f.ClinicalResponse,
		byName: make(map[string]int, len(f.Parameters)),
	}
	if err := r.validate(); err != nil {
		return nil, err
	}
	for i := range r.Parameters {
		p := &r.Parameters[i]
		for j := range p.Scales {
			sc := &p.Scales[j]
			sc.texts = make([]string, len(sc.Bands))
			for k, b := range sc.Bands {
				sc.texts[k] = BandText(b, p.Decimals)
			}
		}
	}
	return r, nil
}

func (r *Ruleset) validate() error {
	switch {
	case r.Name == "":
		return errors.New("name is empty")
	case r.Version == "":
		return errors.New("version is empty")
	case r.RedScore <= 0:
		return errors.New("red_score must be positive")
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
