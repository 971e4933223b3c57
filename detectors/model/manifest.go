// Package model serves learned models (ONNX) as Vigil detectors.
//
// A model lives in a registry folder as <registry>/<name>/<version>/ holding
// manifest.yaml (the Manifest: name, version, sha256 of model.onnx, inputs
// in tensor-column order with their sources, units, fill values and
// training reference distributions, output, alert threshold, training data
// and metrics) and model.onnx. ParseManifest decodes a manifest strictly and
// validates it; Save writes a model version (computing its sha256);
// OpenRegistry/Registry.Load read one back and refuse a model.onnx whose
// hash differs from its manifest.
//
// Inputs are computed by (*Manifest).Vector from a Source — the newest
// value, its time and the count of observations of each catalogue metric,
// and the patient's first-sample time — so the stream engine and offline
// tools (the trainer, the sepsis validation) compute the same features.
//
// Runtime wraps the process-global ONNX Runtime environment
// (github.com/yalue/onnxruntime_go); Runtime.Open creates a Model, a
// session whose Score runs one Arrow record of input vectors in one ORT
// call and turns the output into vigil Scores, with latency, batch size,
// fill and input-drift (PSI) metrics.
package model

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"regexp"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/internal/catalog"
	"gopkg.in/yaml.v3"
)

// Manifest describes one model version. Its YAML form is the registry's
// manifest.yaml; field order and names are the shared contract between the
// trainer (detectors/model/train, export), the validation harness and the
// stream engine. A Manifest is read-only after ParseManifest and safe for
// concurrent use.
type Manifest struct {
	// Name of the model; the score kind is "model:<name>". Lower-case
	// letters, digits, '_' and '-'.
	Name string `yaml:"name"`
	// Version is free text unique per name (a registry folder name).
	Version string `yaml:"version"`
	// SHA256 is the lower-case hex sha256 of model.onnx.
	SHA256 string `yaml:"sha256"`
	// Created is when the model was trained/exported.
	Created time.Time `yaml:"created"`
	// Algorithm is "gbt" or "logreg".
	Algorithm string `yaml:"algorithm"`
	// Description is free text.
	Description string `yaml:"description,omitempty"`
	// Inputs in the order of the columns of the float32 input tensor
	// [N, len(Inputs)].
	Inputs []Input `yaml:"inputs"`
	// InputName is the ONNX graph input name.
	InputName string `yaml:"input_name"`
	// Output names the ONNX output holding P(positive).
	Output Output `yaml:"output"`
	// Threshold is the alert threshold on P(positive): band "high" at or
	// above it, else "low".
	Threshold float64 `yaml:"threshold"`
	// Training describes the training data.
	Training Training `yaml:"training"`
	// Metrics are free named figures (auroc, utility, ...).
	Metrics map[string]float64 `yaml:"metrics,omitempty"`
}

// Input is one model input (one tensor column).
type Input struct {
	// Name is unique within the manifest.
	Name string `yaml:"name"`
	// Source says how the value is computed: "last:<metric>",
	// "age_h:<metric>", "stay_h" or "count:<metric>".
	Source string `yaml:"source"`
	// Unit is the unit the value is fed in (the catalogue's canonical unit
	// for last:, "h" for age_h:/stay_h, "1" for count:).
	Unit string `yaml:"unit"`
	// Fill is the value used when the source has no value.
	Fill float64 `yaml:"fill"`
	// Reference is the training distribution of the input, for drift.
	// Empty (no edges, no proportions) means no drift is computed.
	Reference Reference `yaml:"reference"`

	src source
}

// Reference is a binned distribution: len(Edges)+1 proportions, the first
// for values below Edges[0], the last for values at or above the last edge
// (bin i holds Edges[i-1] <= v < Edges[i]).
type Reference struct {
	Edges       []float64 `yaml:"edges,flow"`
	Proportions []float64 `yaml:"proportions,flow"`
}

// Output names the ONNX output holding P(positive).
type Output struct {
	// Name of the ONNX output.
	Name string `yaml:"name"`
	// Index is the column of P(positive) in a [N, K] output; 0 for a
	// [N, 1] or [N] output.
	Index int `yaml:"index"`
}

// Training describes the data a model was trained on.
type Training struct {
	Data      string `yaml:"data"`
	Rows      int64  `yaml:"rows"`
	Patients  int64  `yaml:"patients"`
	Positives int64  `yaml:"positives"`
	Seed      int64  `yaml:"seed"`
	Split     string `yaml:"split"`
}

// SourceKind is the kind of an input source.
type SourceKind uint8

// Source kinds.
const (
	// SourceLast is "last:<metric>": the newest value at or before the
	// scoring time, carried forward for the whole stay.
	SourceLast SourceKind = iota + 1
	// SourceAge is "age_h:<metric>": hours since that newest value.
	SourceAge
	// SourceStay is "stay_h": hours since the patient's first sample.
	SourceStay
	// SourceCount is "count:<metric>": observations of the metric so far.
	SourceCount
)

type source struct {
	kind   SourceKind
	metric string
}

// ParseSource splits an input source into its kind and metric (empty for
// stay_h).
func ParseSource(s string) (SourceKind, string, error) {
	prefix, metric, hasMetric := strings.Cut(s, ":")
	var k SourceKind
	switch prefix {
	case "last":
		k = SourceLast
	case "age_h":
		k = SourceAge
	case "count":
		k = SourceCount
	case "stay_h":
		if hasMetric {
			return 0, "", fmt.Errorf("stay_h takes no metric, got %q", s)
		}
		return SourceStay, "", nil
	default:
		return 0, "", fmt.Errorf("unknown source %q (want last:<metric>, age_h:<metric>, stay_h or count:<metric>)", s)
	}
	if !hasMetric || !metricRE.MatchString(metric) {
		return 0, "", fmt.Errorf("source %q needs a metric id after %q", s, prefix+":")
	}
	return k, metric, nil
}

// Kind returns the input's source kind (valid after ParseManifest).
func (in *Input) Kind() SourceKind { return in.src.kind }

// Metric returns the catalogue metric the input reads, empty for stay_h
// (valid after ParseManifest).
func (in *Input) Metric() string { return in.src.metric }

var (
	nameRE    = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)
	versionRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$`)
	metricRE  = regexp.MustCompile(`^[a-z0-9_]+$`)
	sha256RE  = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// ParseManifest decodes a manifest strictly (unknown keys, a second
// document or trailing garbage fail) and validates it; errors name the
// field ("inputs[2].source: ...").
func ParseManifest(doc []byte) (*Manifest, error) {
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	dec.KnownFields(true)
	var m Manifest
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("decoding model manifest: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		return nil, errors.New("decoding model manifest: more than one YAML document")
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return &m, nil
}

// Marshal encodes the manifest as YAML (what Save writes).
func (m *Manifest) Marshal() ([]byte, error) {
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(m); err != nil {
		return nil, fmt.Errorf("encoding model manifest: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encoding model manifest: %w", err)
	}
	return b.Bytes(), nil
}

// Kind is the score kind of the model, "model:<name>".
func (m *Manifest) Kind() string { return "model:" + m.Name }

// Validate checks every field and parses the input sources; the error
// joins one message per bad field, each naming the field path. It must be
// called (ParseManifest does) before Vector on a hand-built Manifest.
func (m *Manifest) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("model manifest %s: %s", field, fmt.Sprintf(format, args...)))
	}
	if !nameRE.MatchString(m.Name) {
		bad("name", "%q must be 1-64 of [a-z0-9_-], starting with a letter or digit", m.Name)
	}
	if !versionRE.MatchString(m.Version) {
		bad("version", "%q must be 1-64 of [A-Za-z0-9._+-], starting with a letter or digit", m.Version)
	}
	if !sha256RE.MatchString(m.SHA256) {
		bad("sha256", "%q must be 64 lower-case hex digits (sha256 of model.onnx)", m.SHA256)
	}
	if m.Created.IsZero() {
		bad("created", "required (RFC 3339 time)")
	}
	if m.Algorithm != "gbt" && m.Algorithm != "logreg" {
		bad("algorithm", "%q must be gbt or logreg", m.Algorithm)
	}
	if len(m.Inputs) == 0 {
		bad("inputs", "at least one input required")
	}
	seen := make(map[string]bool, len(m.Inputs))
	for i := range m.Inputs {
		in := &m.Inputs[i]
		f := fmt.Sprintf("inputs[%d]", i)
		switch {
		case in.Name == "":
			bad(f+".name", "required")
		case seen[in.Name]:
			bad(f+".name", "%q is not unique", in.Name)
		}
		seen[in.Name] = true
		k, metric, err := ParseSource(in.Source)
		if err != nil {
			bad(f+".source", "%v", err)
		}
		in.src = source{kind: k, metric: metric}
		if in.Unit == "" {
			bad(f+".unit", "required")
		}
		if !finite(in.Fill) {
			bad(f+".fill", "must be a finite number")
		}
		if err := in.Reference.validate(); err != nil {
			bad(f+".reference", "%v", err)
		}
	}
	if m.InputName == "" {
		bad("input_name", "required (the ONNX graph input name)")
	}
	if m.Output.Name == "" {
		bad("output.name", "required (the ONNX output holding P(positive))")
	}
	if m.Output.Index < 0 {
		bad("output.index", "%d must be >= 0", m.Output.Index)
	}
	if !finite(m.Threshold) || m.Threshold < 0 || m.Threshold > 1 {
		bad("threshold", "%v must be in [0, 1]", m.Threshold)
	}
	for k, v := range m.Metrics {
		if k == "" {
			bad("metrics", "empty metric name")
		}
		if math.IsNaN(v) {
			bad("metrics."+k, "NaN")
		}
	}
	return errors.Join(errs...)
}

func (r *Reference) validate() error {
	if len(r.Edges) == 0 && len(r.Proportions) == 0 {
		return nil
	}
	if len(r.Edges) > 4096 {
		return fmt.Errorf("%d edges, at most 4096", len(r.Edges))
	}
	if len(r.Proportions) != len(r.Edges)+1 {
		return fmt.Errorf("%d edges need %d proportions, got %d", len(r.Edges), len(r.Edges)+1, len(r.Proportions))
	}
	for i, e := range r.Edges {
		if !finite(e) {
			return fmt.Errorf("edges[%d] must be finite", i)
		}
		if i > 0 && e <= r.Edges[i-1] {
			return fmt.Errorf("edges[%d] = %v must be greater than edges[%d] = %v", i, e, i-1, r.Edges[i-1])
		}
	}
	sum := 0.0
	for i, p := range r.Proportions {
		if !finite(p) || p < 0 || p > 1 {
			return fmt.Errorf("proportions[%d] = %v must be in [0, 1]", i, p)
		}
		sum += p
	}
	if math.Abs(sum-1) > 1e-3 {
		return fmt.Errorf("proportions sum to %v, want 1", sum)
	}
	return nil
}

// CheckMetrics reports inputs whose metric is not in the catalogue (the
// registry calls it on load).
func (m *Manifest) CheckMetrics(cat *catalog.Catalog) error {
	var errs []error
	for i := range m.Inputs {
		in := &m.Inputs[i]
		if in.src.metric == "" {
			continue
		}
		if _, ok := cat.Lookup(in.src.metric); !ok {
			errs = append(errs, fmt.Errorf("model manifest inputs[%d].source: %q is not a catalogue metric (one of %s)",
				i, in.src.metric, strings.Join(cat.IDs(), ", ")))
		}
	}
	return errors.Join(errs...)
}

func finite(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }
