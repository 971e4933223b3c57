// Package catalog holds Vigil's closed, versioned catalogue of vital-sign
// metrics: their LOINC codes, canonical UCUM units, accepted unit conversions
// and physiological ranges. Ingest normalises every sample against it; the
// stream engine and detectors name metrics by its ids.
//
// A Catalog is immutable after Load and safe for concurrent use.
package catalog

import (
	"bytes"
	_ "embed"
	"fmt"
	"math"
	"os"
	"sort"

	"gopkg.in/yaml.v3"
)

//go:embed metrics.yaml
var defaultYAML []byte

// Metric is one catalogue entry.
type Metric struct {
	ID      string `yaml:"id"`
	LOINC   string `yaml:"loinc"`
	Display string `yaml:"display"`
	// Unit is the canonical UCUM unit.
	Unit  string       `yaml:"unit"`
	Units []Conversion `yaml:"units"`
	// Range is the plausible physiological range [min, max], inclusive.
	Range [2]float64 `yaml:"range"`
	// ExpectedIntervalS is the nominal sampling interval in seconds.
	ExpectedIntervalS float64 `yaml:"expected_interval_s"`
}

// Conversion converts a value in UCUM unit to the canonical unit as
// value*Factor + Offset (Factor 0 is read as 1).
type Conversion struct {
	UCUM   string  `yaml:"ucum"`
	Factor float64 `yaml:"factor"`
	Offset float64 `yaml:"offset"`
}

// Catalog is a loaded catalogue.
type Catalog struct {
	Version int      `yaml:"version"`
	Metrics []Metric `yaml:"metrics"`

	byID    map[string]*Metric
	byLOINC map[string]*Metric
}

// Default returns the catalogue embedded in the binary.
func Default() *Catalog {
	c, err := Parse(defaultYAML)
	if err != nil {
		// The embedded file is tested; failing here is a build defect.
		panic(fmt.Sprintf("embedded metric catalogue is invalid: %v", err))
	}
	return c
}

// Load returns the catalogue in the file at path (ingest.catalog), or the
// embedded one when path is empty.
func Load(path string) (*Catalog, error) {
	if path == "" {
		return Default(), nil
	}
	doc, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading metric catalogue: %w", err)
	}
	cat, err := Parse(doc)
	if err != nil {
		return nil, fmt.Errorf("metric catalogue %s: %w", path, err)
	}
	return cat, nil
}

// Parse decodes and validates a catalogue document (strict: unknown keys fail).
func Parse(doc []byte) (*Catalog, error) {
	dec := yaml.NewDecoder(bytes.NewReader(doc))
	dec.KnownFields(true)
	var c Catalog
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("decoding metric catalogue: %w", err)
	}
	c.byID = make(map[string]*Metric, len(c.Metrics))
	c.byLOINC = make(map[string]*Metric, len(c.Metrics))
	for i := range c.Metrics {
		m := &c.Metrics[i]
		where := fmt.Sprintf("metrics[%d] (%s)", i, m.ID)
		switch {
		case m.ID == "":
			return nil, fmt.Errorf("%s: id is empty", where)
		case m.Unit == "":
			return nil, fmt.Errorf("%s: unit is empty", where)
		case m.Range[0] >= m.Range[1]:
			return nil, fmt.Errorf("%s: range [%g, %g] is empty", where, m.Range[0], m.Range[1])
		case c.byID[m.ID] != nil:
			return nil, fmt.Errorf("%s: duplicate id", where)
		}
		for j := range m.Units {
			if m.Units[j].Factor == 0 {
				m.Units[j].Factor = 1
			}
		}
		c.byID[m.ID] = m
		if m.LOINC != "" {
			if c.byLOINC[m.LOINC] != nil {
				return nil, fmt.Errorf("%s: duplicate LOINC %s", where, m.LOINC)
			}
			c.byLOINC[m.LOINC] = m
		}
	}
	return &c, nil
}

// Lookup returns the metric with the given id.
func (c *Catalog) Lookup(id string) (*Metric, bool) {
	m, ok := c.byID[id]
	return m, ok
}

// ByLOINC returns the metric keyed by a LOINC code.
func (c *Catalog) ByLOINC(code string) (*Metric, bool) {
	m, ok := c.byLOINC[code]
	return m, ok
}

// IDs returns the metric ids, sorted.
func (c *Catalog) IDs() []string {
	ids := make([]string, 0, len(c.byID))
	for id := range c.byID {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// Normalize converts value in unit to the metric's canonical unit. An empty
// unit is read as the canonical unit. It reports whether a conversion was
// applied, and fails when the unit is not accepted for the metric.
func (m *Metric) Normalize(value float64, unit string) (v float64, converted bool, err error) {
	if unit == "" || unit == m.Unit {
		return value, false, nil
	}
	for _, cv := range m.Units {
		if cv.UCUM == unit {
			return value*cv.Factor + cv.Offset, true, nil
		}
	}
	accepted := []string{m.Unit}
	for _, cv := range m.Units {
		accepted = append(accepted, cv.UCUM)
	}
	return 0, false, fmt.Errorf("unit %q is not convertible to %s for %s (accepted: %q)", unit, m.Unit, m.ID, accepted)
}

// CheckRange reports an error when v is not finite or lies outside the
// metric's physiological range.
func (m *Metric) CheckRange(v float64) error {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return fmt.Errorf("value %v is not a finite number", v)
	}
	if v < m.Range[0] || v > m.Range[1] {
		return fmt.Errorf("value %g %s is outside the physiological range [%g, %g] of %s", v, m.Unit, m.Range[0], m.Range[1], m.ID)
	}
	return nil
}
