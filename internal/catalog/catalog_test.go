package catalog

import (
	"math"
	"testing"
)

func TestDefaultCatalogue(t *testing.T) {
	c := Default()
	for _, tc := range []struct{ id, loinc, unit string }{
		{"heart_rate", "8867-4", "/min"},
		{"spo2", "59408-5", "%"},
		{"respiratory_rate", "9279-1", "/min"},
		{"body_temperature", "8310-5", "Cel"},
		{"systolic_bp", "8480-6", "mm[Hg]"},
		{"diastolic_bp", "8462-4", "mm[Hg]"},
		{"mean_arterial_pressure", "8478-0", "mm[Hg]"},
	} {
		m, ok := c.Lookup(tc.id)
		if !ok {
			t.Fatalf("metric %s missing", tc.id)
		}
		if m.LOINC != tc.loinc || m.Unit != tc.unit {
			t.Errorf("%s: got LOINC %s unit %s, want %s %s", tc.id, m.LOINC, m.Unit, tc.loinc, tc.unit)
		}
		if byCode, ok := c.ByLOINC(tc.loinc); !ok || byCode != m {
			t.Errorf("ByLOINC(%s) does not find %s", tc.loinc, tc.id)
		}
	}
}

func TestNormalize(t *testing.T) {
	c := Default()
	for _, tc := range []struct {
		metric, unit string
		in, want     float64
		converted    bool
	}{
		{"body_temperature", "[degF]", 98.6, 37, true},
		{"body_temperature", "[degF]", 32, 0, true},
		{"body_temperature", "Cel", 37.2, 37.2, false},
		{"body_temperature", "", 37.2, 37.2, false},
		{"systolic_bp", "kPa", 16, 120.0098521353, true},
		{"spo2", "1", 0.97, 97, true},
		{"glucose", "mmol/L", 5.5, 99.0858, true},
	} {
		m, _ := c.Lookup(tc.metric)
		got, conv, err := m.Normalize(tc.in, tc.unit)
		if err != nil {
			t.Fatalf("%s %g %s: %v", tc.metric, tc.in, tc.unit, err)
		}
		if math.Abs(got-tc.want) > 1e-6 || conv != tc.converted {
			t.Errorf("%s %g %s: got %v (converted %v), want %v (%v)", tc.metric, tc.in, tc.unit, got, conv, tc.want, tc.converted)
		}
	}
	hr, _ := c.Lookup("heart_rate")
	if _, _, err := hr.Normalize(80, "mm[Hg]"); err == nil {
		t.Error("heart rate in mm[Hg] accepted")
	}
}

func TestCheckRange(t *testing.T) {
	hr, _ := Default().Lookup("heart_rate")
	for _, v := range []float64{-1, 351, math.NaN(), math.Inf(1)} {
		if hr.CheckRange(v) == nil {
			t.Errorf("heart rate %v accepted", v)
		}
	}
	for _, v := range []float64{0, 40, 350} {
		if err := hr.CheckRange(v); err != nil {
			t.Errorf("heart rate %v refused: %v", v, err)
		}
	}
}

func TestParseRejectsUnknownKeys(t *testing.T) {
	if _, err := Parse([]byte("version: 1\nmetrics:\n  - id: x\n    unit: a\n    range: [0, 1]\n    colour: red\n")); err == nil {
		t.Fatal("unknown key accepted")
	}
}
