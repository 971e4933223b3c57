package alerting

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

//go:embed rules.yaml
var defaultRules []byte

// Rule names of the default NEWS2 rules.
const (
	RuleNEWS2Aggregate = "news2_aggregate_ge_5"
	RuleNEWS2SingleRed = "news2_single_parameter_3"
)

// File is an alert rules file as written in YAML (see rules.yaml).
type File struct {
	// Name, Version and Hash (sha256 hex of the file's bytes) go on
	// every alert event.
	Name    string `yaml:"name"`
	Version string `yaml:"version"`
	Rules   []Rule `yaml:"rules"`
	Hash    string `yaml:"-"`
}

// Rule is one alert condition, as written in the rules file.
type Rule struct {
	Name        string `yaml:"name"`
	Description string `yaml:"description"`
	// Score is the Score.kind the rule reads ("news2", "mews", "qsofa",
	// "baseline", "model:<name>"); Feature instead names a window
	// feature "<metric>:<stat>" (stat: last, mean, min, max). One of the
	// two is set.
	Score   string `yaml:"score"`
	Feature string `yaml:"feature"`
	// Field of the score read: "value" (default) or
	// "single_parameter_red" (1 when set, else 0).
	Field string `yaml:"field"`
	// Direction "above" (default: raise at value >= raise) or "below"
	// (raise at value <= raise).
	Direction string `yaml:"direction"`
	// Raise is the raise threshold, a number or "manifest" (the model's
	// threshold, for score kinds model:<name>).
	Raise Threshold `yaml:"raise"`
	// Clear is the clear threshold (default: Raise): an open alert clears
	// once the value is below it (direction above) or above it (below).
	Clear *float64 `yaml:"clear"`
	// Group and Rank de-duplicate: a rule does not raise while a rule of
	// the same group (default: its own name) with a higher rank has an
	// alert pending or open.
	Group string `yaml:"group"`
	Rank  int    `yaml:"rank"`
	// Severity raised with ("low", "medium", "high"; default medium),
	// raised further by Severities at values at or beyond their at.
	Severity   string  `yaml:"severity"`
	Severities []Level `yaml:"severities"`
	// Recheck, when positive, holds a raise back until a score within
	// this time (event time) confirms it.
	Recheck time.Duration `yaml:"recheck"`
	// ResolveAfter is how long (event time) the value must stay beyond
	// clear before the alert resolves; 0 resolves at once.
	ResolveAfter time.Duration `yaml:"resolve_after"`
	// SuppressAfterAck suppresses re-raises for this time (event time)
	// after an acknowledgement.
	SuppressAfterAck time.Duration `yaml:"suppress_after_ack"`
	// EscalateAfter escalates an unacknowledged alert to the next tier
	// after this time (processing time), again and again up to MaxTier;
	// 0 never escalates.
	EscalateAfter time.Duration `yaml:"escalate_after"`
	MaxTier       uint32        `yaml:"max_tier"`

	// compiled
	kind     string
	above    bool
	redField bool
	clear    float64
	manifest bool
}

// Level is a severity from a value on.
type Level struct {
	At       float64 `yaml:"at"`
	Severity string  `yaml:"severity"`
}

// Threshold is a number, or "manifest" for a model's own threshold.
type Threshold struct {
	Value    float64
	Manifest bool
	set      bool
}

// UnmarshalYAML reads a number or the word manifest.
func (t *Threshold) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode && n.Value == "manifest" {
		*t = Threshold{Manifest: true, set: true}
		return nil
	}
	v, err := strconv.ParseFloat(n.Value, 64)
	if n.Kind != yaml.ScalarNode || err != nil || math.IsNaN(v) || math.IsInf(v, 0) {
		return fmt.Errorf("line %d: threshold %q is neither a finite number nor \"manifest\"", n.Line, n.Value)
	}
	*t = Threshold{Value: v, set: true}
	return nil
}

// Kind is the Score.kind the rule evaluates: its score kind, or
// "feature:<metric>:<stat>" for a feature rule (the kind of the scores
// the engine makes of window features, see FeatureScore).
func (r *Rule) Kind() string { return r.kind }

// Default returns the embedded rules file.
func Default() *File {
	f, err := Parse(defaultRules)
	if err != nil {
		panic(fmt.Sprintf("embedded alert rules: %v", err)) // a build defect, caught by the tests
	}
	return f
}

// Load reads the rules file at path, or returns the embedded one when path
// is empty.
func Load(path string) (*File, error) {
	if path == "" {
		return Default(), nil
	}
	doc, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading alert rules: %w", err)
	}
	f, err := Parse(doc)
	if err != nil {
		return nil, fmt.Errorf("alert rules %s: %w", path, err)
	}
	return f, nil
}

// Parse decodes and checks a rules file strictly (unknown keys are errors)
// and sets its Hash.
func Parse(doc []byte) (*File, error) {
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	dec.KnownFields(true)
	var f File
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("decoding alert rules: %w", err)
	}
	sum := sha256.Sum256(doc)
	f.Hash = hex.EncodeToString(sum[:])
	if err := f.compile(); err != nil {
		return nil, err
	}
	return &f, nil
}

var severities = []string{"low", "medium", "high"}

var featureStats = []string{"last", "mean", "min", "max"}

func (f *File) compile() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if f.Name == "" {
		bad("name: empty")
	}
	if f.Version == "" {
		bad("version: empty")
	}
	if len(f.Rules) == 0 {
		bad("rules: none")
	}
	seen := map[string]bool{}
	for i := range f.Rules {
		r := &f.Rules[i]
		at := fmt.Sprintf("rules[%d] (%s)", i, r.Name)
		if r.Name == "" {
			bad("rules[%d].name: empty", i)
		} else if seen[r.Name] {
			bad("%s.name: duplicate", at)
		}
		seen[r.Name] = true
		switch {
		case (r.Score == "") == (r.Feature == ""):
			bad("%s: set exactly one of score and feature", at)
		case r.Score != "":
			r.kind = r.Score
		default:
			metric, stat, ok := strings.Cut(r.Feature, ":")
			if !ok || metric == "" || !slices.Contains(featureStats, stat) {
				bad("%s.feature: %q is not <metric>:<stat> with stat one of %v", at, r.Feature, featureStats)
			}
			r.kind = "feature:" + r.Feature
		}
		switch r.Field {
		case "", "value":
		case "single_parameter_red":
			r.redField = true
			if r.Feature != "" {
				bad("%s.field: single_parameter_red is a score field", at)
			}
		default:
			bad("%s.field: %q is not value or single_parameter_red", at, r.Field)
		}
		switch r.Direction {
		case "", "above":
			r.above = true
		case "below":
		default:
			bad("%s.direction: %q is not above or below", at, r.Direction)
		}
		if !r.Raise.set {
			bad("%s.raise: missing", at)
		}
		r.manifest = r.Raise.Manifest
		if r.manifest && !strings.HasPrefix(r.Score, "model:") {
			bad("%s.raise: manifest applies to model:<name> scores only", at)
		}
		switch {
		case r.Clear != nil:
			r.clear = *r.Clear
			if !r.manifest && (r.above && r.clear > r.Raise.Value || !r.above && r.clear < r.Raise.Value) {
				bad("%s.clear: %v is beyond raise %v: the alert would clear while it holds", at, r.clear, r.Raise.Value)
			}
		case !r.manifest:
			r.clear = r.Raise.Value
		}
		if r.Group == "" {
			r.Group = r.Name
		}
		if r.Severity == "" {
			r.Severity = "medium"
		}
		if !slices.Contains(severities, r.Severity) {
			bad("%s.severity: %q is not one of %v", at, r.Severity, severities)
		}
		for j, l := range r.Severities {
			if !slices.Contains(severities, l.Severity) {
				bad("%s.severities[%d].severity: %q is not one of %v", at, j, l.Severity, severities)
			}
		}
		for _, d := range []struct {
			name string
			v    time.Duration
		}{{"recheck", r.Recheck}, {"resolve_after", r.ResolveAfter}, {"suppress_after_ack", r.SuppressAfterAck}, {"escalate_after", r.EscalateAfter}} {
			if d.v < 0 {
				bad("%s.%s: negative", at, d.name)
			}
		}
		if r.MaxTier > 0 && r.EscalateAfter == 0 {
			bad("%s.max_tier: %d without escalate_after", at, r.MaxTier)
		}
	}
	return errors.Join(errs...)
}

// read returns the value the rule reads from s.
func (r *Rule) read(s *vigilv1.Score) float64 {
	if r.redField {
		if s.GetSingleParameterRed() {
			return 1
		}
		return 0
	}
	return s.GetValue()
}

// thresholds returns the rule's raise and clear thresholds for a score of
// its kind; ok is false when a manifest threshold is unknown.
func (r *Rule) thresholds(manifest func(kind string) (float64, bool)) (raise, clear float64, ok bool) {
	if !r.manifest {
		return r.Raise.Value, r.clear, true
	}
	if manifest == nil {
		return 0, 0, false
	}
	t, ok := manifest(r.kind)
	if !ok {
		return 0, 0, false
	}
	if r.Clear != nil {
		return t, min(r.clear, t), true
	}
	return t, t, true
}

// holds reports whether v is at or beyond raise; clears whether it is
// beyond clear the other way.
func (r *Rule) holds(v, raise float64) bool {
	if r.above {
		return v >= raise
	}
	return v <= raise
}

func (r *Rule) clears(v, clear float64) bool {
	if r.above {
		return v < clear
	}
	return v > clear
}

// severity is the severity the rule raises with at value v.
func (r *Rule) severity(v float64) string {
	sev := r.Severity
	for _, l := range r.Severities {
		if r.above && v >= l.At || !r.above && v <= l.At {
			if slices.Index(severities, l.Severity) > slices.Index(severities, sev) {
				sev = l.Severity
			}
		}
	}
	return sev
}

func (r *Rule) source() string {
	if r.Feature != "" {
		return "feature:" + r.Feature
	}
	return "score:" + r.Score
}
