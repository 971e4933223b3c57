package ews

import (
	"crypto/sha256"
	"encoding/hex"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	"google.golang.org/protobuf/proto"
)

const at = int64(1_800_000_000_000)

// vitals builds a Request from metric values all measured at `at`.
func vitals(v map[string]float64) Request {
	return Request{
		Tenant: "t", Patient: "p", AtMs: at, Staleness: time.Hour,
		Latest: func(m string) (Observation, bool) {
			x, ok := v[m]
			return Observation{Value: x, TimeMs: at}, ok
		},
	}
}

func component(t *testing.T, s *vigilv1.Score, param string) *vigilv1.ScoreComponent {
	t.Helper()
	for _, c := range s.GetComponents() {
		if c.GetParameter() == param {
			return c
		}
	}
	t.Fatalf("no component %s in %v", param, s)
	return nil
}

func TestEmbeddedRulesetLoads(t *testing.T) {
	r := Default()
	if r.Name != "news2" || r.Version == "" || r.RedScore != 3 {
		t.Errorf("name %q version %q red %v", r.Name, r.Version, r.RedScore)
	}
	sum := sha256.Sum256(embedded)
	if r.Hash != hex.EncodeToString(sum[:]) {
		t.Errorf("hash %s is not the sha256 of the file", r.Hash)
	}
	want := []string{"respiration_rate", "spo2", "air_or_oxygen", "systolic_bp", "pulse", "consciousness", "temperature"}
	var got []string
	for _, p := range r.Parameters {
		got = append(got, p.Name)
	}
	if !slices.Equal(got, want) {
		t.Errorf("parameters %v, want %v", got, want)
	}
}

// TestEveryBandEdge checks both sides of every published edge, plus values
// between edges that rounding must put on the right side.
func TestEveryBandEdge(t *testing.T) {
	r := Default()
	cases := []struct {
		param, metric string
		value         float64
		points        float64
		band          string
	}{
		// Respiration rate: <=8:3, 9-11:1, 12-20:0, 21-24:2, >=25:3.
		{"respiration_rate", "respiratory_rate", 8, 3, "<=8"},
		{"respiration_rate", "respiratory_rate", 9, 1, "9-11"},
		{"respiration_rate", "respiratory_rate", 11, 1, "9-11"},
		{"respiration_rate", "respiratory_rate", 12, 0, "12-20"},
		{"respiration_rate", "respiratory_rate", 20, 0, "12-20"},
		{"respiration_rate", "respiratory_rate", 21, 2, "21-24"},
		{"respiration_rate", "respiratory_rate", 24, 2, "21-24"},
		{"respiration_rate", "respiratory_rate", 25, 3, ">=25"},
		{"respiration_rate", "respiratory_rate", 8.49, 3, "<=8"},
		{"respiration_rate", "respiratory_rate", 8.5, 1, "9-11"},
		{"respiration_rate", "respiratory_rate", 20.5, 2, "21-24"},
		{"respiration_rate", "respiratory_rate", 0, 3, "<=8"},
		// SpO2 scale 1: <=91:3, 92-93:2, 94-95:1, >=96:0.
		{"spo2", "spo2", 91, 3, "<=91"},
		{"spo2", "spo2", 92, 2, "92-93"},
		{"spo2", "spo2", 93, 2, "92-93"},
		{"spo2", "spo2", 94, 1, "94-95"},
		{"spo2", "spo2", 95, 1, "94-95"},
		{"spo2", "spo2", 96, 0, ">=96"},
		{"spo2", "spo2", 91.5, 2, "92-93"},
		{"spo2", "spo2", 95.4, 1, "94-95"},
		{"spo2", "spo2", 100, 0, ">=96"},
		// Air or oxygen: fio2 > 21 % or oxygen flow > 0 is oxygen (2).
		{"air_or_oxygen", "fio2", 21, 0, "Air"},
		{"air_or_oxygen", "fio2", 21.5, 2, "Oxygen"},
		{"air_or_oxygen", "fio2", 28, 2, "Oxygen"},
		{"air_or_oxygen", "oxygen_flow", 0, 0, "Air"},
		{"air_or_oxygen", "oxygen_flow", 0.5, 2, "Oxygen"},
		{"air_or_oxygen", "oxygen_flow", 2, 2, "Oxygen"},
		// Systolic BP: <=90:3, 91-100:2, 101-110:1, 111-219:0, >=220:3.
		{"systolic_bp", "systolic_bp", 90, 3, "<=90"},
		{"systolic_bp", "systolic_bp", 91, 2, "91-100"},
		{"systolic_bp", "systolic_bp", 100, 2, "91-100"},
		{"systolic_bp", "systolic_bp", 101, 1, "101-110"},
		{"systolic_bp", "systolic_bp", 110, 1, "101-110"},
		{"systolic_bp", "systolic_bp", 111, 0, "111-219"},
		{"systolic_bp", "systolic_bp", 219, 0, "111-219"},
		{"systolic_bp", "systolic_bp", 220, 3, ">=220"},
		{"systolic_bp", "systolic_bp", 90.5, 2, "91-100"},
		{"systolic_bp", "systolic_bp", 219.5, 3, ">=220"},
		{"systolic_bp", "systolic_bp", 110.4, 1, "101-110"},
		// Pulse: <=40:3, 41-50:1, 51-90:0, 91-110:1, 111-130:2, >=131:3.
		{"pulse", "heart_rate", 40, 3, "<=40"},
		{"pulse", "heart_rate", 41, 1, "41-50"},
		{"pulse", "heart_rate", 50, 1, "41-50"},
		{"pulse", "heart_rate", 51, 0, "51-90"},
		{"pulse", "heart_rate", 90, 0, "51-90"},
		{"pulse", "heart_rate", 91, 1, "91-110"},
		{"pulse", "heart_rate", 110, 1, "91-110"},
		{"pulse", "heart_rate", 111, 2, "111-130"},
		{"pulse", "heart_rate", 130, 2, "111-130"},
		{"pulse", "heart_rate", 131, 3, ">=131"},
		{"pulse", "heart_rate", 90.5, 1, "91-110"},
		{"pulse", "heart_rate", 90.49, 0, "51-90"},
		{"pulse", "heart_rate", 40.5, 1, "41-50"},
		{"pulse", "heart_rate", 130.5, 3, ">=131"},
		// Consciousness (ACVPU code): Alert 0, C/V/P/U 3.
		{"consciousness", "consciousness", 0, 0, "Alert"},
		{"consciousness", "consciousness", 1, 3, "New confusion"},
		{"consciousness", "consciousness", 2, 3, "Voice"},
		{"consciousness", "consciousness", 3, 3, "Pain"},
		{"consciousness", "consciousness", 4, 3, "Unresponsive"},
		// Temperature: <=35.0:3, 35.1-36.0:1, 36.1-38.0:0, 38.1-39.0:1, >=39.1:2.
		{"temperature", "body_temperature", 35.0, 3, "<=35.0"},
		{"temperature", "body_temperature", 35.1, 1, "35.1-36.0"},
		{"temperature", "body_temperature", 36.0, 1, "35.1-36.0"},
		{"temperature", "body_temperature", 36.1, 0, "36.1-38.0"},
		{"temperature", "body_temperature", 38.0, 0, "36.1-38.0"},
		{"temperature", "body_temperature", 38.1, 1, "38.1-39.0"},
		{"temperature", "body_temperature", 39.0, 1, "38.1-39.0"},
		{"temperature", "body_temperature", 39.1, 2, ">=39.1"},
		{"temperature", "body_temperature", 36.05, 0, "36.1-38.0"},
		{"temperature", "body_temperature", 36.04, 1, "35.1-36.0"},
		{"temperature", "body_temperature", 35.05, 1, "35.1-36.0"},
		{"temperature", "body_temperature", 35.04, 3, "<=35.0"},
		{"temperature", "body_temperature", 38.05, 1, "38.1-39.0"},
		{"temperature", "body_temperature", 39.05, 2, ">=39.1"},
		{"temperature", "body_temperature", 39.04, 1, "38.1-39.0"},
	}
	for _, c := range cases {
		s := r.Score(vitals(map[string]float64{c.metric: c.value}))
		comp := component(t, s, c.param)
		if comp.Points != c.points || comp.Band != c.band || comp.Missing || comp.Stale {
			t.Errorf("%s %s=%v: %v points, band %q (missing %v stale %v); want %v, %q",
				c.param, c.metric, c.value, comp.Points, comp.Band, comp.Missing, comp.Stale, c.points, c.band)
		}
		if comp.InputValue != c.value || comp.Metric != c.metric || comp.InputTimeMs != at {
			t.Errorf("%s: input recorded as %s=%v at %d", c.param, comp.Metric, comp.InputValue, comp.InputTimeMs)
		}
	}
}

func TestRoundHalfAway(t *testing.T) {
	cases := []struct {
		v    float64
		d    int
		want float64
	}{
		{36.05, 1, 36.1}, {36.04, 1, 36.0}, {36.15, 1, 36.2}, {90.5, 0, 91}, {90.49, 0, 90},
		{-2.5, 0, -3}, {-2.45, 1, -2.5}, {99.95, 1, 100.0}, {9.5, 0, 10}, {0.05, 1, 0.1},
		{37, 1, 37}, {1e-7, 0, 0}, {0.5, 0, 1}, {1.005, 2, 1.01}, {2.675, 2, 2.68},
	}
	for _, c := range cases {
		if got := RoundHalfAway(c.v, c.d); got != c.want {
			t.Errorf("RoundHalfAway(%v, %d) = %v, want %v", c.v, c.d, got, c.want)
		}
	}
}

// TestWorkedExamples checks whole scores against the chart by hand.
func TestWorkedExamples(t *testing.T) {
	r := Default()
	cases := []struct {
		name   string
		v      map[string]float64
		value  float64
		band   string
		red    bool
		top    []string
		points map[string]float64
	}{
		{
			// RR 23 (2), SpO2 93 (2), air (0), SBP 98 (2), pulse 131 (3),
			// Alert (0), 38.5 °C (1) = 10: high.
			name: "deteriorating",
			v: map[string]float64{"respiratory_rate": 23, "spo2": 93, "fio2": 21, "systolic_bp": 98,
				"heart_rate": 131, "consciousness": 0, "body_temperature": 38.5},
			value: 10, band: "high", red: true,
			top: []string{"pulse", "respiration_rate", "spo2", "systolic_bp", "temperature"},
			points: map[string]float64{"respiration_rate": 2, "spo2": 2, "air_or_oxygen": 0, "systolic_bp": 2,
				"pulse": 3, "consciousness": 0, "temperature": 1},
		},
		{
			name: "well",
			v: map[string]float64{"respiratory_rate": 16, "spo2": 97, "oxygen_flow": 0, "systolic_bp": 120,
				"heart_rate": 70, "consciousness": 0, "body_temperature": 37.0},
			value: 0, band: "low", top: []string{},
		},
		{
			// A single red parameter with aggregate 3: low-medium.
			name: "single red",
			v: map[string]float64{"respiratory_rate": 16, "spo2": 91, "systolic_bp": 120,
				"heart_rate": 70, "consciousness": 0, "body_temperature": 37.0},
			value: 3, band: "low-medium", red: true, top: []string{"spo2"},
		},
		{
			// New confusion alone: 3, low-medium.
			name: "new confusion",
			v: map[string]float64{"respiratory_rate": 18, "spo2": 96, "systolic_bp": 130,
				"heart_rate": 80, "consciousness": 1, "body_temperature": 36.8},
			value: 3, band: "low-medium", red: true, top: []string{"consciousness"},
		},
		{
			// RR 21 (2) + pulse 111 (2) = 4 without a red: low.
			name: "four",
			v: map[string]float64{"respiratory_rate": 21, "spo2": 96, "systolic_bp": 130,
				"heart_rate": 111, "consciousness": 0, "body_temperature": 37.2},
			value: 4, band: "low", top: []string{"respiration_rate", "pulse"},
		},
		{
			// RR 22 (2) + SBP 105 (1) + pulse 95 (1) + 38.5 (1) = 5: medium.
			name: "five",
			v: map[string]float64{"respiratory_rate": 22, "spo2": 97, "systolic_bp": 105,
				"heart_rate": 95, "consciousness": 0, "body_temperature": 38.5},
			value: 5, band: "medium", top: []string{"respiration_rate", "systolic_bp", "pulse", "temperature"},
		},
		{
			// Oxygen 2 L/min (2) + SpO2 94 (1) + RR 25 (3) + pulse 100 (1) = 7: high.
			name: "seven on oxygen",
			v: map[string]float64{"respiratory_rate": 25, "spo2": 94, "oxygen_flow": 2, "fio2": 21,
				"systolic_bp": 125, "heart_rate": 100, "consciousness": 0, "body_temperature": 37.0},
			value: 7, band: "high", red: true, top: []string{"respiration_rate", "air_or_oxygen", "spo2", "pulse"},
		},
		{
			// RR 24 (2) + pulse 112 (2) + 39.1 (2) = 6, no red: medium.
			name: "six",
			v: map[string]float64{"respiratory_rate": 24, "spo2": 96, "systolic_bp": 150,
				"heart_rate": 112, "consciousness": 0, "body_temperature": 39.1},
			value: 6, band: "medium", top: []string{"respiration_rate", "pulse", "temperature"},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := r.Score(vitals(c.v))
			if s.Value != c.value || s.Band != c.band || s.SingleParameterRed != c.red {
				t.Errorf("value %v band %q red %v; want %v %q %v", s.Value, s.Band, s.SingleParameterRed, c.value, c.band, c.red)
			}
			if len(s.TopContributors) != len(c.top) || (len(c.top) > 0 && !slices.Equal(s.TopContributors, c.top)) {
				t.Errorf("top contributors %v, want %v", s.TopContributors, c.top)
			}
			for p, want := range c.points {
				if got := component(t, s, p).Points; got != want {
					t.Errorf("%s: %v points, want %v", p, got, want)
				}
			}
			if s.Kind != "news2" || s.Ruleset != "news2" || s.RulesetVersion != r.Version || s.RulesetHash != r.Hash || s.EventTimeMs != at {
				t.Errorf("provenance: %s %s %s %s %d", s.Kind, s.Ruleset, s.RulesetVersion, s.RulesetHash, s.EventTimeMs)
			}
		})
	}
}

func TestMissingAndStale(t *testing.T) {
	r := Default()
	obs := map[string]Observation{
		"respiratory_rate": {Value: 26, TimeMs: at - 10_000},                   // 3
		"spo2":             {Value: 90, TimeMs: at - time.Hour.Milliseconds()}, // exactly 1 h: still current, 3
		"heart_rate":       {Value: 135, TimeMs: at - time.Hour.Milliseconds() - 1, Unit: "/min"},
		"body_temperature": {Value: 35, TimeMs: at - 3*time.Hour.Milliseconds()},
		"fio2":             {Value: 40, TimeMs: at - 2*time.Hour.Milliseconds()}, // stale oxygen
	}
	req := Request{Tenant: "t", Patient: "p", AtMs: at, Staleness: time.Hour,
		Latest: func(m string) (Observation, bool) { o, ok := obs[m]; return o, ok }}
	s := r.Score(req)
	if s.Value != 6 || s.Band != "medium" {
		t.Errorf("value %v band %s, want 6 medium (stale inputs must not score)", s.Value, s.Band)
	}
	if !slices.Equal(s.Missing, []string{"systolic_bp", "consciousness"}) {
		t.Errorf("missing %v", s.Missing)
	}
	if !slices.Equal(s.Stale, []string{"air_or_oxygen", "pulse", "temperature"}) {
		t.Errorf("stale %v", s.Stale)
	}
	p := component(t, s, "pulse")
	if !p.Stale || p.Points != 0 || p.InputValue != 135 || p.InputUnit != "/min" {
		t.Errorf("stale pulse component %v", p)
	}
	o := component(t, s, "air_or_oxygen")
	if !o.Stale || o.Metric != "fio2" || o.InputValue != 40 {
		t.Errorf("stale oxygen component %v", o)
	}
	m := component(t, s, "consciousness")
	if !m.Missing || m.Metric != "consciousness" || m.InputTimeMs != 0 {
		t.Errorf("missing component %v", m)
	}
	if r.Score(Request{AtMs: at, Staleness: time.Hour, Latest: func(string) (Observation, bool) { return Observation{}, false }}) != nil {
		t.Error("a score with every input missing")
	}
}

// TestOxygenEitherInput: oxygen when any current input says so, even if
// another current input says air.
func TestOxygenEitherInput(t *testing.T) {
	r := Default()
	s := r.Score(vitals(map[string]float64{"fio2": 21, "oxygen_flow": 1}))
	c := component(t, s, "air_or_oxygen")
	if c.Points != 2 || c.Metric != "oxygen_flow" || c.Band != "Oxygen" {
		t.Errorf("fio2 21 + flow 1: %v", c)
	}
	s = r.Score(vitals(map[string]float64{"fio2": 21}))
	if c := component(t, s, "air_or_oxygen"); c.Points != 0 || c.Band != "Air" || c.Metric != "fio2" {
		t.Errorf("fio2 21 alone: %v", c)
	}
	s = r.Score(vitals(map[string]float64{"spo2": 97}))
	if c := component(t, s, "air_or_oxygen"); !c.Missing || c.Metric != "fio2,oxygen_flow" {
		t.Errorf("no oxygen inputs: %v", c)
	}
}

func TestScoreIDDeterministic(t *testing.T) {
	r := Default()
	v := map[string]float64{"spo2": 93, "heart_rate": 120}
	a, b := r.Score(vitals(v)), r.Score(vitals(v))
	if a.Id == "" || a.Id != b.Id || len(a.Id) != 32 {
		t.Errorf("ids %q %q", a.Id, b.Id)
	}
	if a.Id != ScoreID("t", "p", "news2", at, r.Hash) {
		t.Error("id is not ScoreID of tenant, patient, kind, time, hash")
	}
	for _, other := range []string{
		ScoreID("t", "p", "news2", at+1, r.Hash), ScoreID("t", "q", "news2", at, r.Hash),
		ScoreID("u", "p", "news2", at, r.Hash), ScoreID("t", "p", "news2", at, "other"),
		ScoreID("t/", "p", "news2", at, r.Hash), ScoreID("t", "/p", "news2", at, r.Hash),
	} {
		if other == a.Id {
			t.Errorf("id collision: %s", other)
		}
	}
}

func TestChanged(t *testing.T) {
	r := Default()
	base := r.Score(vitals(map[string]float64{"heart_rate": 118, "spo2": 95}))
	same := r.Score(vitals(map[string]float64{"heart_rate": 126, "spo2": 94})) // same bands
	if Changed(base, same) {
		t.Error("values within the same bands counted as a change")
	}
	if !Changed(nil, base) {
		t.Error("first score not a change")
	}
	if !Changed(base, r.Score(vitals(map[string]float64{"heart_rate": 131, "spo2": 95}))) {
		t.Error("points change not detected")
	}
	// Same total, different components: pulse 1 + spo2 1 vs pulse 2 + spo2 0.
	a := r.Score(vitals(map[string]float64{"heart_rate": 95, "spo2": 95}))
	b := r.Score(vitals(map[string]float64{"heart_rate": 115, "spo2": 97}))
	if a.Value != b.Value || !Changed(a, b) {
		t.Errorf("component change with equal totals (%v, %v) not detected", a.Value, b.Value)
	}
	c := r.Score(vitals(map[string]float64{"heart_rate": 95, "spo2": 95, "consciousness": 0}))
	if !Changed(a, c) {
		t.Error("an input going from missing to present (0 points) not detected")
	}
}

func TestStrictDecodingAndValidation(t *testing.T) {
	good := string(embedded)
	cases := []struct {
		name, doc, want string
	}{
		{"unknown key", strings.Replace(good, "red_score: 3", "red_score: 3\nred_scor: 3", 1), "red_scor"},
		{"gap", strings.Replace(good, "{min: 9, max: 11, points: 1}", "{min: 10, max: 11, points: 1}", 1), "must start at 9"},
		{"overlap", strings.Replace(good, "{min: 92, max: 93, points: 2}", "{min: 91, max: 93, points: 2}", 1), "must start at 92"},
		{"finer than resolution", strings.Replace(good, "{min: 35.1, max: 36.0, points: 1}", "{min: 35.1, max: 36.05, points: 1}", 1), "finer"},
		{"open top missing", strings.Replace(good, "{min: 131, points: 3}", "{min: 131, max: 250, points: 3}", 1), "above 250"},
		{"no version", strings.Replace(good, "version: rcp-2017.2", "version: \"\"", 1), "version"},
		{"last response conditional", strings.Replace(good, "{band: low, aggregate_min: 0}", "{band: low, aggregate_min: 1}", 1), "last row"},
	}
	for _, c := range cases {
		if c.doc == good {
			t.Fatalf("%s: replacement did not apply", c.name)
		}
		_, err := Parse([]byte(c.doc))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error containing %q", c.name, err, c.want)
		}
	}
}

func TestLoadFileHashesItsBytes(t *testing.T) {
	dir := t.TempDir()
	doc := strings.Replace(string(embedded), "version: rcp-2017.2", "version: local-1", 1)
	path := filepath.Join(dir, "local.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(doc))
	if r.Version != "local-1" || r.Hash != hex.EncodeToString(sum[:]) || r.Hash == Default().Hash {
		t.Errorf("loaded %s %s", r.Version, r.Hash)
	}
	if _, err := Load(filepath.Join(dir, "missing.yaml")); err == nil {
		t.Error("loading a missing file succeeded")
	}
}

// scale2Doc is a test ruleset shaped like the next issue's SpO2 scale 2
// (RCP 2017): <=83:3, 84-85:2, 86-87:1, 88-92 and >=93 on air:0, on oxygen
// 93-94:1, 95-96:2, >=97:3. It exercises scales and conditional bands.
const scale2Doc = `
kind: news2
name: news2-scale2-test
version: test
red_score: 3
parameters:
  - name: spo2
    metric: spo2
    unit: "%"
    decimals: 0
    scales:
      - name: scale_1
        bands:
          - {max: 91, points: 3}
          - {min: 92, max: 93, points: 2}
          - {min: 94, max: 95, points: 1}
          - {min: 96, points: 0}
      - name: scale_2
        select: {metric: spo2_target_scale, value: 2}
        bands:
          - {max: 83, points: 3}
          - {min: 84, max: 85, points: 2}
          - {min: 86, max: 87, points: 1}
          - {min: 88, max: 92, points: 0}
          - {min: 93, points: 0, text: ">=93 on air", when: {parameter: air_or_oxygen, value: 0}}
          - {min: 93, max: 94, points: 1, text: "93-94 on oxygen", when: {parameter: air_or_oxygen, value: 1}}
          - {min: 95, max: 96, points: 2, text: "95-96 on oxygen", when: {parameter: air_or_oxygen, value: 1}}
          - {min: 97, points: 3, text: ">=97 on oxygen", when: {parameter: air_or_oxygen, value: 1}}
  - name: air_or_oxygen
    unit: "1"
    decimals: 0
    any_above:
      - {metric: oxygen_flow, unit: L/min, above: 0}
    scales:
      - name: default
        bands:
          - {max: 0, points: 0, text: Air}
          - {min: 1, points: 2, text: Oxygen}
clinical_response:
  - {band: low}
`

func TestScalesAndConditionalBands(t *testing.T) {
	r, err := Parse([]byte(scale2Doc))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		spo2, flow float64
		scale      string
		points     float64
		band       string
	}{
		{95, 0, "", 1, "94-95"}, // default is the first scale
		{88, 0, "scale_2", 0, "scale_2: 88-92"},
		{83, 0, "scale_2", 3, "scale_2: <=83"},
		{96, 0, "scale_2", 0, "scale_2: >=93 on air"},
		{96, 2, "scale_2", 2, "scale_2: 95-96 on oxygen"},
		{97, 2, "scale_2", 3, "scale_2: >=97 on oxygen"},
		{92, 2, "scale_2", 0, "scale_2: 88-92"},
		{92, 2, "flag", 0, "scale_2: 88-92"}, // chosen by the patient's flag
	}
	for _, c := range cases {
		req := vitals(map[string]float64{"spo2": c.spo2, "oxygen_flow": c.flow})
		if c.scale == "flag" {
			req = vitals(map[string]float64{"spo2": c.spo2, "oxygen_flow": c.flow, "spo2_target_scale": 2})
		} else if c.scale != "" {
			req.Scales = map[string]string{"spo2": c.scale}
		}
		comp := component(t, r.Score(req), "spo2")
		if comp.Points != c.points || comp.Band != c.band {
			t.Errorf("spo2 %v flow %v %s: %v %q, want %v %q", c.spo2, c.flow, c.scale, comp.Points, comp.Band, c.points, c.band)
		}
	}
	// Oxygen status unknown: scale 2 above 92 cannot be scored.
	req := vitals(map[string]float64{"spo2": 95})
	req.Scales = map[string]string{"spo2": "scale_2"}
	s := r.Score(req)
	if c := component(t, s, "spo2"); !c.Missing || !slices.Contains(s.Missing, "spo2") {
		t.Errorf("scale 2 without oxygen status: %v", c)
	}
	// A gap under one condition fails validation.
	bad := strings.Replace(scale2Doc, "{min: 95, max: 96, points: 2, text: \"95-96 on oxygen\"", "{min: 95, max: 95, points: 2, text: \"95-96 on oxygen\"", 1)
	if _, err := Parse([]byte(bad)); err == nil || !strings.Contains(err.Error(), "air_or_oxygen = 1") {
		t.Errorf("gap under a condition: %v", err)
	}
}

// TestUnchangedAgreesWithChanged: Unchanged(prev, req) is exactly "Score(req)
// is non-nil and Changed does not tell it from prev", over random vitals
// (present, stale or missing, values across every band) and prevs from the
// same distribution, and it allocates nothing.
func TestUnchangedAgreesWithChanged(t *testing.T) {
	r := Default()
	rng := rand.New(rand.NewPCG(5, 7))
	ranges := map[string][2]float64{"respiratory_rate": {4, 30}, "spo2": {80, 100}, "heart_rate": {30, 140},
		"systolic_bp": {80, 230}, "body_temperature": {34, 40}, "consciousness": {0, 1}, "fio2": {21, 30}, "oxygen_flow": {0, 3}}
	random := func() Request {
		obs := map[string]Observation{}
		for m, rg := range ranges {
			switch rng.IntN(6) {
			case 0: // missing
			case 1:
				obs[m] = Observation{Value: rg[0] + rng.Float64()*(rg[1]-rg[0]), TimeMs: at - 2*time.Hour.Milliseconds()}
			default:
				obs[m] = Observation{Value: math.Round(rg[0] + rng.Float64()*(rg[1]-rg[0])), TimeMs: at - rng.Int64N(1000)}
			}
		}
		return Request{Tenant: "t", Patient: "p", AtMs: at, Staleness: time.Hour,
			Latest: func(m string) (Observation, bool) { o, ok := obs[m]; return o, ok }}
	}
	unchanged, changed := 0, 0
	for range 5000 {
		prev := r.Score(random())
		req := random()
		if rng.IntN(4) == 0 {
			req = vitals(map[string]float64{"heart_rate": 80, "spo2": 97})
			prev = r.Score(vitals(map[string]float64{"heart_rate": 81, "spo2": 98}))
		}
		s := r.Score(req)
		want := s != nil && prev != nil && !Changed(prev, s)
		if got := r.Unchanged(prev, req); got != want {
			t.Fatalf("Unchanged = %v, want %v\nprev %v\nnext %v", got, want, prev, s)
		}
		if d := r.Digest(prev); r.UnchangedDigest(&d, req) != want {
			t.Fatalf("UnchangedDigest = %v, want %v\nprev %v\nnext %v", !want, want, prev, s)
		}
		if want {
			unchanged++
		} else {
			changed++
		}
	}
	if unchanged < 100 || changed < 100 {
		t.Fatalf("unbalanced cases: %d unchanged, %d changed", unchanged, changed)
	}
	prev := r.Score(vitals(map[string]float64{"heart_rate": 80, "spo2": 97}))
	req := vitals(map[string]float64{"heart_rate": 81, "spo2": 98})
	if n := testing.AllocsPerRun(100, func() { r.Unchanged(prev, req) }); n != 0 && !raceEnabled {
		t.Errorf("Unchanged allocates %v times per call", n)
	}
	d := r.Digest(prev)
	if n := testing.AllocsPerRun(100, func() { r.UnchangedDigest(&d, req) }); n != 0 && !raceEnabled {
		t.Errorf("UnchangedDigest allocates %v times per call", n)
	}
	// The zero Digest, and one of another ruleset's score, match nothing.
	if r.UnchangedDigest(&Digest{}, vitals(map[string]float64{"heart_rate": 80, "spo2": 97})) {
		t.Error("the zero Digest matches a request")
	}
	same := vitals(map[string]float64{"heart_rate": 80, "spo2": 97})
	if d := r.Digest(prev); !r.UnchangedDigest(&d, same) {
		t.Error("the Digest of a score does not match its own request")
	}
	other := proto.Clone(prev).(*vigilv1.Score)
	other.RulesetHash = "other"
	if d := r.Digest(other); r.UnchangedDigest(&d, same) {
		t.Error("the Digest of another ruleset's score matches a request")
	}
}
