package ews

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// chart is one published row of a scoring table, written as the
// publication prints it (independently of the YAML): bands ascending,
// "<=8:3 9-11:1 12-20:0 21-24:2 >=25:3" (inclusive edges : points).
type chart struct {
	kind, param, metric string
	decimals            int
	published           string
	// context: other inputs present in every request (the scale flag,
	// oxygen), and the scale / condition of the YAML bands that apply.
	context map[string]float64
	scale   string
	cond    *Condition
}

var published = []chart{
	// NEWS2, RCP 2017 chart 1.
	{kind: KindNEWS2, param: "respiration_rate", metric: "respiratory_rate", published: "<=8:3 9-11:1 12-20:0 21-24:2 >=25:3"},
	{kind: KindNEWS2, param: "spo2", metric: "spo2", published: "<=91:3 92-93:2 94-95:1 >=96:0", scale: "scale_1"},
	{kind: KindNEWS2, param: "spo2", metric: "spo2", published: "<=83:3 84-85:2 86-87:1 88-92:0 >=93:0",
		context: map[string]float64{"spo2_target_scale": 2, "fio2": 21}, scale: "scale_2", cond: &Condition{"air_or_oxygen", 0}},
	{kind: KindNEWS2, param: "spo2", metric: "spo2", published: "<=83:3 84-85:2 86-87:1 88-92:0 93-94:1 95-96:2 >=97:3",
		context: map[string]float64{"spo2_target_scale": 2, "oxygen_flow": 2}, scale: "scale_2", cond: &Condition{"air_or_oxygen", 1}},
	// A flag of 1 (or none) keeps scale 1.
	{kind: KindNEWS2, param: "spo2", metric: "spo2", published: "<=91:3 92-93:2 94-95:1 >=96:0",
		context: map[string]float64{"spo2_target_scale": 1, "oxygen_flow": 2}, scale: "scale_1"},
	{kind: KindNEWS2, param: "systolic_bp", metric: "systolic_bp", published: "<=90:3 91-100:2 101-110:1 111-219:0 >=220:3"},
	{kind: KindNEWS2, param: "pulse", metric: "heart_rate", published: "<=40:3 41-50:1 51-90:0 91-110:1 111-130:2 >=131:3"},
	// ACVPU code 0 A, 1 C, 2 V, 3 P, 4 U: new confusion scores 3.
	{kind: KindNEWS2, param: "consciousness", metric: "consciousness", published: "<=0:0 1:3 2:3 3:3 >=4:3"},
	{kind: KindNEWS2, param: "temperature", metric: "body_temperature", decimals: 1, published: "<=35.0:3 35.1-36.0:1 36.1-38.0:0 38.1-39.0:1 >=39.1:2"},
	// MEWS, Subbe et al. 2001 table 1 (edges as read in the file's header).
	{kind: KindMEWS, param: "systolic_bp", metric: "systolic_bp", published: "<=70:3 71-80:2 81-100:1 101-199:0 >=200:2"},
	{kind: KindMEWS, param: "heart_rate", metric: "heart_rate", published: "<=40:2 41-50:1 51-100:0 101-110:1 111-129:2 >=130:3"},
	{kind: KindMEWS, param: "respiratory_rate", metric: "respiratory_rate", published: "<=8:2 9-14:0 15-20:1 21-29:2 >=30:3"},
	{kind: KindMEWS, param: "temperature", metric: "body_temperature", decimals: 1, published: "<=34.9:2 35.0-38.4:0 >=38.5:2"},
	// AVPU: A 0, (C as V) 1, V 1, P 2, U 3.
	{kind: KindMEWS, param: "avpu", metric: "consciousness", published: "<=0:0 1:1 2:1 3:2 >=4:3"},
	// qSOFA, Sepsis-3 (Singer et al. 2016).
	{kind: KindQSOFA, param: "respiratory_rate", metric: "respiratory_rate", published: "<=21:0 >=22:1"},
	{kind: KindQSOFA, param: "systolic_bp", metric: "systolic_bp", published: "<=100:1 >=101:0"},
	{kind: KindQSOFA, param: "altered_mentation", metric: "consciousness", published: "<=0:0 >=1:1"},
}

type pubBand struct {
	min, max float64 // ±Inf when open
	points   float64
}

func parsePublished(t *testing.T, s string) []pubBand {
	t.Helper()
	var out []pubBand
	num := func(x string) float64 {
		v, err := strconv.ParseFloat(x, 64)
		if err != nil {
			t.Fatalf("published %q: %v", s, err)
		}
		return v
	}
	for _, tok := range strings.Fields(s) {
		i := strings.LastIndexByte(tok, ':')
		rng, pts := tok[:i], num(tok[i+1:])
		b := pubBand{min: math.Inf(-1), max: math.Inf(1), points: pts}
		switch {
		case strings.HasPrefix(rng, "<="):
			b.max = num(rng[2:])
		case strings.HasPrefix(rng, ">="):
			b.min = num(rng[2:])
		case strings.Contains(rng[1:], "-"):
			j := strings.IndexByte(rng[1:], '-') + 1
			b.min, b.max = num(rng[:j]), num(rng[j+1:])
		default:
			b.min, b.max = num(rng), num(rng)
		}
		out = append(out, b)
	}
	return out
}

func (b pubBand) String() string {
	f := func(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }
	switch {
	case math.IsInf(b.min, -1):
		return "<=" + f(b.max) + ":" + f(b.points)
	case math.IsInf(b.max, 1):
		return ">=" + f(b.min) + ":" + f(b.points)
	case b.min == b.max:
		return f(b.min) + ":" + f(b.points)
	}
	return f(b.min) + "-" + f(b.max) + ":" + f(b.points)
}

// TestEveryBandEdgeOfEveryTable scores both sides of every published edge
// of every table (and the rounding midpoint between them), and checks that
// the YAML's bands are exactly the published ones: a wrong, missing or
// extra edge in a file fails here.
func TestEveryBandEdgeOfEveryTable(t *testing.T) {
	tables := map[string]*Ruleset{}
	for _, k := range Kinds() {
		tables[k] = Embedded(k)
	}
	covered := map[string]bool{} // kind/param/scale/cond checked
	for _, c := range published {
		name := fmt.Sprintf("%s/%s/%s/%v", c.kind, c.param, c.scale, c.context)
		t.Run(name, func(t *testing.T) {
			r := tables[c.kind]
			bands := parsePublished(t, c.published)
			score := func(v float64) (float64, string) {
				in := map[string]float64{c.metric: v}
				for m, x := range c.context {
					in[m] = x
				}
				s := r.Score(vitals(in))
				comp := component(t, s, c.param)
				if comp.Missing || comp.Stale || comp.InputValue != v {
					t.Fatalf("%s=%v: component %v", c.metric, v, comp)
				}
				return comp.Points, comp.Band
			}
			step := math.Pow10(-c.decimals)
			check := func(v, want float64, why string) {
				t.Helper()
				if got, band := score(v); got != want {
					t.Errorf("%s=%v (%s): %v points (band %q), want %v", c.metric, v, why, got, band, want)
				}
			}
			for i, b := range bands {
				if i == 0 {
					check(b.max-10*step, b.points, "far below the first edge")
				}
				if i == len(bands)-1 {
					check(b.min+10*step, b.points, "far above the last edge")
					continue
				}
				next := bands[i+1]
				if next.min != RoundHalfAway(b.max+step, c.decimals) {
					t.Fatalf("published bands %v and %v do not meet", b, next)
				}
				check(b.max, b.points, "upper edge of "+b.String())
				check(next.min, next.points, "lower edge of "+next.String())
				// Between the two edges, rounding half away decides.
				mid := b.max + step/2
				check(RoundHalfAway(mid-step/100, c.decimals+2), b.points, "just below the midpoint")
				check(RoundHalfAway(mid, c.decimals+1), next.points, "the midpoint")
			}
			// The YAML's bands that apply here are exactly the published ones.
			p, ok := r.Parameter(c.param)
			if !ok {
				t.Fatalf("no parameter %s", c.param)
			}
			sc := &p.Scales[0]
			for i := range p.Scales {
				if p.Scales[i].Name == c.scale {
					sc = &p.Scales[i]
				}
			}
			var got []string
			for _, b := range sc.Bands {
				if b.When != nil && (c.cond == nil || *b.When != *c.cond) {
					continue
				}
				pb := pubBand{min: math.Inf(-1), max: math.Inf(1), points: b.Points}
				if b.Min != nil {
					pb.min = *b.Min
				}
				if b.Max != nil {
					pb.max = *b.Max
				}
				got = append(got, pb.String())
			}
			slices.SortFunc(got, func(a, b string) int { return strings.Compare(a, b) })
			var want []string
			for _, b := range bands {
				want = append(want, b.String())
			}
			slices.SortFunc(want, func(a, b string) int { return strings.Compare(a, b) })
			if !slices.Equal(got, want) || p.Decimals != c.decimals || p.Metric != c.metric {
				t.Errorf("YAML bands %v (decimals %d, metric %s), published %v", got, p.Decimals, p.Metric, want)
			}
			covered[c.kind+"/"+c.param+"/"+sc.Name+fmt.Sprint(c.cond)] = true
		})
	}
	// Every scale (and condition) of every table is covered, except NEWS2's
	// derived air/oxygen row, tested in TestEveryBandEdge.
	for _, k := range Kinds() {
		for _, p := range tables[k].Parameters {
			if len(p.AnyAbove) > 0 {
				continue
			}
			for _, sc := range p.Scales {
				conds := []*Condition{nil}
				for _, b := range sc.Bands {
					if b.When != nil && !slices.ContainsFunc(conds, func(c *Condition) bool { return c != nil && *c == *b.When }) {
						w := *b.When
						conds = append(conds, &w)
					}
				}
				if len(conds) > 1 {
					conds = conds[1:]
				}
				for _, cd := range conds {
					if key := k + "/" + p.Name + "/" + sc.Name + fmt.Sprint(cd); !covered[key] {
						t.Errorf("no published chart checks %s", key)
					}
				}
			}
		}
	}
}

// TestResponseBands checks the clinical-response rows of every table at
// their edges: NEWS2 low 0-4, low-medium = a single 3 with aggregate < 5,
// medium 5-6, high >= 7; MEWS (Subbe) high >= 5; qSOFA positive >= 2.
func TestResponseBands(t *testing.T) {
	cases := []struct {
		kind  string
		total float64
		max   float64
		want  string
		red   bool
	}{
		{KindNEWS2, 0, 0, "low", false}, {KindNEWS2, 4, 2, "low", false}, {KindNEWS2, 3, 3, "low-medium", true},
		{KindNEWS2, 4, 3, "low-medium", true}, {KindNEWS2, 5, 2, "medium", false}, {KindNEWS2, 5, 3, "medium", true},
		{KindNEWS2, 6, 3, "medium", true}, {KindNEWS2, 7, 2, "high", false}, {KindNEWS2, 20, 3, "high", true},
		{KindMEWS, 0, 0, "low", false}, {KindMEWS, 4, 3, "low", false}, {KindMEWS, 5, 2, "high", false}, {KindMEWS, 14, 3, "high", false},
		{KindQSOFA, 0, 0, "negative", false}, {KindQSOFA, 1, 1, "negative", false}, {KindQSOFA, 2, 1, "positive", false},
		{KindQSOFA, 3, 1, "positive", false},
	}
	for _, c := range cases {
		r := Embedded(c.kind)
		if got := r.response(c.total, c.max); got != c.want {
			t.Errorf("%s aggregate %v max %v: %q, want %q", c.kind, c.total, c.max, got, c.want)
		}
		if red := r.RedScore > 0 && c.max >= r.RedScore; red != c.red {
			t.Errorf("%s max %v: red %v, want %v", c.kind, c.max, red, c.red)
		}
	}
}

// TestPublishedWorkedExamples scores whole patients through each table.
func TestPublishedWorkedExamples(t *testing.T) {
	cases := []struct {
		name, kind string
		v          map[string]float64
		value      float64
		band       string
		red        bool
		points     map[string]float64
	}{
		{
			// A COPD patient with a prescribed 88-92 % target (scale 2) on
			// 2 L/min oxygen: RR 22 (2), SpO2 90 (scale 2: 0), oxygen (2),
			// SBP 115 (0), pulse 95 (1), Alert (0), 37.8 (0) = 5: medium.
			name: "NEWS2 scale 2 on target", kind: KindNEWS2,
			v: map[string]float64{"spo2_target_scale": 2, "respiratory_rate": 22, "spo2": 90, "oxygen_flow": 2,
				"systolic_bp": 115, "heart_rate": 95, "consciousness": 0, "body_temperature": 37.8},
			value: 5, band: "medium", points: map[string]float64{"spo2": 0, "air_or_oxygen": 2, "respiration_rate": 2, "pulse": 1},
		},
		{
			// The same patient on scale 1 would score SpO2 90 as 3: 8, high.
			name: "NEWS2 same patient on scale 1", kind: KindNEWS2,
			v: map[string]float64{"respiratory_rate": 22, "spo2": 90, "oxygen_flow": 2,
				"systolic_bp": 115, "heart_rate": 95, "consciousness": 0, "body_temperature": 37.8},
			value: 8, band: "high", red: true, points: map[string]float64{"spo2": 3},
		},
		{
			// Scale 2 over-oxygenated: SpO2 98 on oxygen scores 3 (red);
			// RR 18 (0), oxygen (2), others 0: 5, medium.
			name: "NEWS2 scale 2 over-oxygenated", kind: KindNEWS2,
			v: map[string]float64{"spo2_target_scale": 2, "respiratory_rate": 18, "spo2": 98, "fio2": 28,
				"systolic_bp": 130, "heart_rate": 80, "consciousness": 0, "body_temperature": 37.0},
			value: 5, band: "medium", red: true, points: map[string]float64{"spo2": 3, "air_or_oxygen": 2},
		},
		{
			// Scale 2 on air at 95 %: 0. New confusion (3): low-medium.
			name: "NEWS2 scale 2 on air, new confusion", kind: KindNEWS2,
			v: map[string]float64{"spo2_target_scale": 2, "respiratory_rate": 18, "spo2": 95, "fio2": 21,
				"systolic_bp": 130, "heart_rate": 80, "consciousness": 1, "body_temperature": 37.0},
			value: 3, band: "low-medium", red: true, points: map[string]float64{"spo2": 0, "consciousness": 3},
		},
		{
			// qSOFA 2/3: RR 24 and SBP 95, Alert: positive.
			name: "qSOFA 2 of 3", kind: KindQSOFA,
			v:     map[string]float64{"respiratory_rate": 24, "systolic_bp": 95, "consciousness": 0, "heart_rate": 120},
			value: 2, band: "positive", points: map[string]float64{"respiratory_rate": 1, "systolic_bp": 1, "altered_mentation": 0},
		},
		{
			// qSOFA 3/3 with new confusion.
			name: "qSOFA 3 of 3", kind: KindQSOFA,
			v:     map[string]float64{"respiratory_rate": 22, "systolic_bp": 100, "consciousness": 1},
			value: 3, band: "positive", points: map[string]float64{"altered_mentation": 1},
		},
		{
			// qSOFA 1/3 (RR 21 misses, SBP 101 misses, Voice): negative.
			name: "qSOFA 1 of 3", kind: KindQSOFA,
			v:     map[string]float64{"respiratory_rate": 21, "systolic_bp": 101, "consciousness": 2},
			value: 1, band: "negative", points: map[string]float64{"respiratory_rate": 0, "systolic_bp": 0, "altered_mentation": 1},
		},
		{
			// MEWS (Subbe table 1): SBP 95 (1), HR 115 (2), RR 24 (2),
			// 38.6 °C (2), responds to Voice (1) = 8: at or above Subbe's
			// trigger of 5.
			name: "MEWS septic", kind: KindMEWS,
			v: map[string]float64{"systolic_bp": 95, "heart_rate": 115, "respiratory_rate": 24,
				"body_temperature": 38.6, "consciousness": 2},
			value: 8, band: "high", points: map[string]float64{"systolic_bp": 1, "heart_rate": 2, "respiratory_rate": 2, "temperature": 2, "avpu": 1},
		},
		{
			// MEWS: a well patient with RR 16 scores 1 (Subbe's 15-20 row).
			name: "MEWS well", kind: KindMEWS,
			v: map[string]float64{"systolic_bp": 130, "heart_rate": 72, "respiratory_rate": 16,
				"body_temperature": 37.0, "consciousness": 0},
			value: 1, band: "low", points: map[string]float64{"respiratory_rate": 1},
		},
		{
			// MEWS 4 -> 5 crosses the trigger: HR 101 (1), RR 21 (2), SBP
			// 100 (1) = 4, low; with new confusion (as V, 1) = 5, high.
			name: "MEWS trigger", kind: KindMEWS,
			v: map[string]float64{"systolic_bp": 100, "heart_rate": 101, "respiratory_rate": 21,
				"body_temperature": 37.0, "consciousness": 1},
			value: 5, band: "high", points: map[string]float64{"avpu": 1},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := Embedded(c.kind)
			s := r.Score(vitals(c.v))
			if s.Value != c.value || s.Band != c.band || s.SingleParameterRed != c.red {
				t.Errorf("value %v band %q red %v; want %v %q %v\n%v", s.Value, s.Band, s.SingleParameterRed, c.value, c.band, c.red, s)
			}
			for p, want := range c.points {
				if got := component(t, s, p).Points; got != want {
					t.Errorf("%s: %v points, want %v", p, got, want)
				}
			}
			if s.Kind != c.kind || s.Ruleset != r.Name || s.RulesetVersion != r.Version || s.RulesetHash != r.Hash ||
				s.Id != ScoreID("t", "p", c.kind, at, r.Hash) {
				t.Errorf("provenance: %s %s %s %s %s", s.Kind, s.Ruleset, s.RulesetVersion, s.RulesetHash, s.Id)
			}
		})
	}
}

func TestEmbeddedTables(t *testing.T) {
	for _, k := range Kinds() {
		r := Embedded(k)
		doc, _ := embeddedTable(k)
		if r.Kind != k || r.Name == "" || r.Version == "" || !strings.Contains(r.Source, "20") || r.Hash == "" {
			t.Errorf("%s: kind %q name %q version %q source %q", k, r.Kind, r.Name, r.Version, r.Source)
		}
		if l, err := LoadKind(k, ""); err != nil || l.Hash != r.Hash {
			t.Errorf("%s: LoadKind: %v", k, err)
		}
		// A table of one kind cannot be loaded as another.
		path := filepath.Join(t.TempDir(), k+".yaml")
		if err := os.WriteFile(path, doc, 0o600); err != nil {
			t.Fatal(err)
		}
		for _, other := range Kinds() {
			_, err := LoadKind(other, path)
			if (err == nil) != (other == k) {
				t.Errorf("LoadKind(%s, a %s file): %v", other, k, err)
			}
		}
	}
	if _, err := LoadKind("pews", ""); err == nil {
		t.Error("an unknown kind without a file loaded")
	}
}

// siteMEWS is a hospital's own MEWS table (the shape several UK trusts used
// after Subbe: temperature and heart-rate rows differ, a single 3 is
// flagged), loaded in place of the default.
const siteMEWS = `
kind: mews
name: mews-st-elsewhere
version: "2024-03"
source: St Elsewhere NHS Trust observation chart, March 2024.
red_score: 3
parameters:
  - name: heart_rate
    metric: heart_rate
    unit: /min
    decimals: 0
    scales:
      - name: default
        bands:
          - {max: 39, points: 3}
          - {min: 40, max: 50, points: 1}
          - {min: 51, max: 100, points: 0}
          - {min: 101, max: 120, points: 1}
          - {min: 121, points: 3}
  - name: temperature
    metric: body_temperature
    unit: Cel
    decimals: 1
    scales:
      - name: default
        bands:
          - {max: 35.9, points: 1}
          - {min: 36.0, max: 37.9, points: 0}
          - {min: 38.0, points: 1}
clinical_response:
  - {band: urgent, aggregate_min: 4}
  - {band: review, single_parameter_min: 3}
  - {band: routine}
`

func TestSiteDefinedMEWS(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mews.yaml")
	if err := os.WriteFile(path, []byte(siteMEWS), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := LoadKind(KindMEWS, path)
	if err != nil {
		t.Fatal(err)
	}
	s := r.Score(vitals(map[string]float64{"heart_rate": 121, "body_temperature": 36.5}))
	if s.Kind != KindMEWS || s.Ruleset != "mews-st-elsewhere" || s.RulesetVersion != "2024-03" || s.RulesetHash == Embedded(KindMEWS).Hash {
		t.Errorf("provenance %s %s %s %s", s.Kind, s.Ruleset, s.RulesetVersion, s.RulesetHash)
	}
	if s.Value != 3 || s.Band != "review" || !s.SingleParameterRed {
		t.Errorf("site table: %v %q red %v, want 3 review red", s.Value, s.Band, s.SingleParameterRed)
	}
	// Heart rate 120 scores 1 here, 2 in Subbe's table.
	if c := component(t, r.Score(vitals(map[string]float64{"heart_rate": 120})), "heart_rate"); c.Points != 1 {
		t.Errorf("site table hr 120: %v", c.Points)
	}
	if c := component(t, Embedded(KindMEWS).Score(vitals(map[string]float64{"heart_rate": 120})), "heart_rate"); c.Points != 2 {
		t.Errorf("Subbe hr 120: %v", c.Points)
	}
	// A site file with a gap is refused, naming the file.
	bad := strings.Replace(siteMEWS, "{min: 40, max: 50, points: 1}", "{min: 41, max: 50, points: 1}", 1)
	if err := os.WriteFile(path, []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKind(KindMEWS, path); err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "must start at 40") {
		t.Errorf("gap in a site table: %v", err)
	}
}

// TestPerParameterStaleness: each input is judged against its own limit.
func TestPerParameterStaleness(t *testing.T) {
	r := Default()
	lim := r.Limits(func(param, metric string) time.Duration {
		switch {
		case param == "consciousness":
			return 4 * time.Hour
		case metric == "fio2":
			return 10 * time.Minute
		}
		return time.Hour
	})
	h := time.Hour.Milliseconds()
	obs := map[string]Observation{
		"consciousness":    {Value: 1, TimeMs: at - 3*h},        // within 4 h: scores 3
		"heart_rate":       {Value: 135, TimeMs: at - 2*h},      // beyond 1 h: stale
		"fio2":             {Value: 40, TimeMs: at - 20*60_000}, // beyond 10 min: stale
		"oxygen_flow":      {Value: 0, TimeMs: at - 30*60_000},  // within 1 h: air
		"respiratory_rate": {Value: 16, TimeMs: at - h},         // exactly at the limit: current
	}
	req := Request{Tenant: "t", Patient: "p", AtMs: at, Staleness: time.Minute, Limits: lim,
		Latest: func(m string) (Observation, bool) { o, ok := obs[m]; return o, ok }}
	s := r.Score(req)
	if c := component(t, s, "consciousness"); c.Stale || c.Points != 3 {
		t.Errorf("consciousness 3 h old with a 4 h limit: %v", c)
	}
	if c := component(t, s, "pulse"); !c.Stale {
		t.Errorf("pulse 2 h old with a 1 h limit: %v", c)
	}
	if c := component(t, s, "air_or_oxygen"); c.Stale || c.Points != 0 || c.Metric != "oxygen_flow" {
		t.Errorf("stale fio2, current oxygen flow: %v", c)
	}
	if c := component(t, s, "respiration_rate"); c.Stale {
		t.Errorf("rr at exactly its limit: %v", c)
	}
	if !slices.Equal(s.Stale, []string{"pulse"}) {
		t.Errorf("stale %v", s.Stale)
	}
	// Limits of another table are ignored (Staleness applies).
	req.Limits = Embedded(KindMEWS).Limits(func(string, string) time.Duration { return 24 * time.Hour })
	if s := r.Score(req); !slices.Contains(s.Stale, "consciousness") {
		t.Errorf("another table's limits applied: stale %v", s.Stale)
	}
	// The scale flag is never stale: a 3-day-old flag still selects scale 2.
	obs["spo2_target_scale"] = Observation{Value: 2, TimeMs: at - 72*h}
	obs["spo2"] = Observation{Value: 89, TimeMs: at}
	req.Limits = lim
	if c := component(t, r.Score(req), "spo2"); c.Points != 0 || !strings.HasPrefix(c.Band, "SpO2 scale 2") {
		t.Errorf("old scale-2 flag: %v", c)
	}
	if n := testing.AllocsPerRun(100, func() {
		d := r.Digest(r.Score(req))
		_ = r.UnchangedDigest(&d, req)
	}); n == 0 {
		t.Log("(allocation check below)")
	}
	d := r.Digest(r.Score(req))
	if n := testing.AllocsPerRun(100, func() { r.UnchangedDigest(&d, req) }); n != 0 && !raceEnabled {
		t.Errorf("UnchangedDigest with limits and scale 2 allocates %v times", n)
	}
	if !r.UnchangedDigest(&d, req) {
		t.Error("digest does not match its own request")
	}
}

// TestSelectValidation: only non-default scales select, and need a metric.
func TestSelectValidation(t *testing.T) {
	good := string(embedded)
	for _, c := range []struct{ name, doc, want string }{
		{"no select", strings.Replace(good, "        select: {metric: spo2_target_scale, value: 2}\n", "", 1), "needs select"},
		{"fractional", strings.Replace(good, "value: 2}\n        bands", "value: 1.5}\n        bands", 1), "whole-number"},
		{"no kind", strings.Replace(good, "kind: news2\n", "", 1), "kind"},
		{"bad kind", strings.Replace(good, "kind: news2\n", "kind: NEWS 2\n", 1), "kind"},
		{"two documents", good + "\n---\nkind: mews\n", "more than one document"},
	} {
		if c.doc == good {
			t.Fatalf("%s: replacement did not apply", c.name)
		}
		if _, err := Parse([]byte(c.doc)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
}

// TestCompactKeepsWhatChangeDetectionReads: a Compact score answers
// Changed, Unchanged and Digest as the full score does.
func TestCompactKeepsWhatChangeDetectionReads(t *testing.T) {
	for _, k := range Kinds() {
		r := Embedded(k)
		a := r.Score(vitals(map[string]float64{"heart_rate": 118, "spo2": 95, "respiratory_rate": 23, "systolic_bp": 99}))
		b := r.Score(vitals(map[string]float64{"heart_rate": 131, "spo2": 95, "respiratory_rate": 23, "systolic_bp": 99}))
		ca := Compact(a)
		if Changed(ca, a) || Changed(a, ca) || Changed(ca, b) != Changed(a, b) || ca.Value != a.Value || ca.Band != a.Band {
			t.Errorf("%s: compact %v of %v", k, ca, a)
		}
		req := vitals(map[string]float64{"heart_rate": 119, "spo2": 95, "respiratory_rate": 23, "systolic_bp": 99})
		if r.Unchanged(ca, req) != r.Unchanged(a, req) {
			t.Errorf("%s: Unchanged differs on the compact score", k)
		}
		d, dc := r.Digest(a), r.Digest(ca)
		if r.UnchangedDigest(&d, req) != r.UnchangedDigest(&dc, req) {
			t.Errorf("%s: digests differ", k)
		}
		if n := testing.AllocsPerRun(100, func() { Compact(a) }); n > 1 {
			t.Errorf("%s: Compact allocates %v times", k, n)
		}
	}
	if Compact(nil) != nil {
		t.Error("Compact(nil) is not nil")
	}
}

// BenchmarkScore builds a score of each table (what every window end does
// per table and patient).
func BenchmarkScore(b *testing.B) {
	req := vitals(map[string]float64{"heart_rate": 80, "spo2": 97, "respiratory_rate": 16, "systolic_bp": 120,
		"body_temperature": 37, "consciousness": 0})
	for _, k := range Kinds() {
		r := Embedded(k)
		b.Run(k, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				r.Score(req)
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "scores/s")
		})
	}
}
