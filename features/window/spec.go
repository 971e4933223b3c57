package window

import (
	_ "embed"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/vigilhealth/vigil/internal/datafile"
)

//go:embed spec.yaml
var embeddedSpec []byte

// Spec is a window specification as written in YAML (see spec.yaml): which
// metrics get which windows, and the per-metric settings of the features.
// It is plain data; Compile turns it into an Engine.
type Spec struct {
	Version int                   `yaml:"version"`
	Metrics map[string]MetricSpec `yaml:"metrics"`
	Windows []WindowSpec          `yaml:"windows"`
	// Hash is the sha256 (hex) of the document the spec was parsed from.
	Hash string `yaml:"-"`
}

// MetricSpec is the per-metric part of a Spec.
type MetricSpec struct {
	// Decimals is the device resolution in decimal places (0..4).
	Decimals     int           `yaml:"decimals"`
	Desaturation *DesatSpec    `yaml:"desaturation"`
	WearTime     *WearTimeSpec `yaml:"wear_time"`
	HRV          bool          `yaml:"hrv"`
}

// DesatSpec configures SpO2 desaturation events.
type DesatSpec struct {
	// Drop is how far (in the metric's unit) below the baseline a sample
	// must be to count as desaturated.
	Drop float64 `yaml:"drop"`
	// MinDuration is how long the drop must last (first to last low sample).
	MinDuration time.Duration `yaml:"min_duration"`
	// MaxGap without samples ends an event.
	MaxGap time.Duration `yaml:"max_gap"`
}

// WearTimeSpec configures wear time.
type WearTimeSpec struct {
	// MaxGap is the longest gap between two samples still counted as worn.
	MaxGap time.Duration `yaml:"max_gap"`
}

// WindowSpec is one window definition.
type WindowSpec struct {
	Name string `yaml:"name"`
	// Kind is tumbling, hopping or session.
	Kind string        `yaml:"kind"`
	Size time.Duration `yaml:"size"`
	Step time.Duration `yaml:"step"`
	Gap  time.Duration `yaml:"gap"`
	// Metrics the window aggregates (each must be in Spec.Metrics).
	Metrics []string `yaml:"metrics"`
	// Derived cross-metric features: mean_arterial_pressure,
	// pulse_pressure, shock_index.
	Derived []string `yaml:"derived"`
}

// Derived feature names.
const (
	DerivedMAP           = "mean_arterial_pressure"
	DerivedPulsePressure = "pulse_pressure"
	DerivedShockIndex    = "shock_index"
)

// DefaultSpec returns the embedded window spec.
func DefaultSpec() *Spec {
	s, err := ParseSpec(embeddedSpec)
	if err != nil {
		// The embedded file is tested; failing here is a build defect.
		panic(fmt.Sprintf("embedded window spec is invalid: %v", err))
	}
	return s
}

// LoadSpec reads the spec at path, or returns the embedded one when path
// is empty (internal/datafile: strict decoding, sha256 of the bytes).
func LoadSpec(path string) (*Spec, error) {
	f, err := datafile.Read(path, embeddedSpec)
	if err != nil {
		return nil, fmt.Errorf("reading window spec: %w", err)
	}
	s, err := ParseSpec(f.Bytes)
	if err != nil && path != "" {
		return nil, fmt.Errorf("window spec %s: %w", path, err)
	}
	return s, err
}

// ParseSpec decodes (strictly: unknown keys fail) and validates a spec.
func ParseSpec(doc []byte) (*Spec, error) {
	var s Spec
	if err := datafile.Decode(doc, &s); err != nil {
		return nil, fmt.Errorf("decoding window spec: %w", err)
	}
	s.Hash = datafile.Hash(doc)
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return &s, nil
}

// Validate checks the spec; errors name the field.
func (s *Spec) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if s.Version != 1 {
		bad("version", "%d is not a known version (1)", s.Version)
	}
	if len(s.Metrics) > maxMetrics {
		bad("metrics", "%d metrics, at most %d", len(s.Metrics), maxMetrics)
	}
	for name, m := range s.Metrics {
		f := "metrics." + name
		if m.Decimals < 0 || m.Decimals > 4 {
			bad(f+".decimals", "%d is not in 0..4", m.Decimals)
		}
		if d := m.Desaturation; d != nil && (d.Drop <= 0 || d.MinDuration < 0 || d.MaxGap <= 0) {
			bad(f+".desaturation", "drop and max_gap must be positive, min_duration not negative")
		}
		if w := m.WearTime; w != nil && w.MaxGap < time.Second {
			bad(f+".wear_time.max_gap", "must be at least 1s")
		}
	}
	names := map[string]bool{}
	// The features table identifies a window by kind, size and step.
	shapes := map[string]string{}
	sessions := map[string]string{}
	for i, w := range s.Windows {
		f := fmt.Sprintf("windows[%d]", i)
		if w.Name == "" || names[w.Name] {
			bad(f+".name", "%q is empty or not unique", w.Name)
		}
		names[w.Name] = true
		whole := func(field string, d time.Duration) {
			if d < time.Second || d%time.Second != 0 {
				bad(f+"."+field, "must be a whole number of seconds, at least 1s, got %s", d)
			}
		}
		switch w.Kind {
		case "tumbling":
			whole("size", w.Size)
			if w.Step != 0 || w.Gap != 0 {
				bad(f, "a tumbling window has only a size")
			}
		case "hopping":
			whole("size", w.Size)
			whole("step", w.Step)
			if w.Step > 0 && (w.Size%w.Step != 0 || w.Step >= w.Size) {
				bad(f+".step", "must divide size and be smaller, got size %s step %s", w.Size, w.Step)
			}
			if w.Gap != 0 {
				bad(f, "a hopping window has no gap")
			}
		case "session":
			whole("gap", w.Gap)
			if w.Size != 0 || w.Step != 0 {
				bad(f, "a session window has only a gap")
			}
		default:
			bad(f+".kind", "%q is not tumbling, hopping or session", w.Kind)
		}
		if w.Kind == "tumbling" || w.Kind == "hopping" {
			shape := fmt.Sprintf("%s size %s step %s", w.Kind, w.Size, w.Step)
			if other, dup := shapes[shape]; dup {
				bad(f, "has the kind, size and step of window %s (merge their metrics into one window)", other)
			}
			shapes[shape] = w.Name
		}
		if len(w.Metrics) == 0 {
			bad(f+".metrics", "must not be empty")
		}
		for _, m := range w.Metrics {
			if _, ok := s.Metrics[m]; !ok {
				bad(f+".metrics", "%q is not in metrics", m)
			}
			if w.Kind == "session" {
				if other, dup := sessions[m]; dup {
					bad(f+".metrics", "%q already has the session window %s", m, other)
				}
				sessions[m] = w.Name
			}
		}
		for _, d := range w.Derived {
			if d != DerivedMAP && d != DerivedPulsePressure && d != DerivedShockIndex {
				bad(f+".derived", "%q is not one of %s, %s, %s", d, DerivedMAP, DerivedPulsePressure, DerivedShockIndex)
			}
			if w.Kind == "session" {
				bad(f+".derived", "session windows have no derived features")
			}
		}
	}
	if len(s.Windows) > maxDefs {
		bad("windows", "%d windows, at most %d", len(s.Windows), maxDefs)
	}
	if len(errs) == 0 {
		if p := s.paneMs(); p > 0 && p < 1000 {
			bad("windows", "pane (gcd of sizes and steps) %d ms is below 1s", p)
		}
		for _, w := range s.Windows {
			if w.Kind != "session" && s.paneMs() > 0 && w.Size.Milliseconds()/s.paneMs() > 1440 {
				bad("windows", "window %s spans %d panes, at most 1440", w.Name, w.Size.Milliseconds()/s.paneMs())
			}
		}
	}
	return errors.Join(errs...)
}

// paneMs is the gcd of every tumbling/hopping size and step (0 when there
// is none).
func (s *Spec) paneMs() int64 {
	var g int64
	for _, w := range s.Windows {
		if w.Kind == "session" {
			continue
		}
		g = gcd(g, w.Size.Milliseconds())
		if w.Step > 0 {
			g = gcd(g, w.Step.Milliseconds())
		}
	}
	return g
}

func gcd(a, b int64) int64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

const (
	maxMetrics = 64 // metric sets are uint64 bitmasks
	maxDefs    = 16
)

// sortedMetrics returns the spec's metric names, sorted.
func (s *Spec) sortedMetrics() []string {
	out := make([]string, 0, len(s.Metrics))
	for n := range s.Metrics {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

func pow10(d int) int64 { return int64(math.Round(math.Pow(10, float64(d)))) }
