package mapping

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/testenv"
)

func TestMetricLookups(t *testing.T) {
	tb := Default()
	for _, tc := range []struct{ system, code, want string }{
		// Several MDC codes onto one metric.
		{"MDC", "147842", "heart_rate"},
		{"MDC", "149530", "heart_rate"},
		{"MDC", "149546", "heart_rate"},
		{"MDC", "150456", "spo2"},
		{"MDC", "MDC_PULS_OXIM_SAT_O2", "spo2"},
		{"mdc", "mdc_puls_oxim_sat_o2", "spo2"},
		{"MDC", "2::19384", "spo2"}, // partition::term
		{"urn:iso:std:iso:11073:10101", "150456", "spo2"},
		{"urn:oid:2.16.840.1.113883.6.24", "151562", "respiratory_rate"},
		{"MDC", "151578", "respiratory_rate"}, // impedance
		{"MDC", "151594", "respiratory_rate"}, // CO2
		{"MDC", "150021", "systolic_bp"},
		{"MDC", "150022", "diastolic_bp"},
		{"MDC", "150023", "mean_arterial_pressure"},
		{"MDC", "150017", "systolic_bp"},
		{"MDC", "150034", "diastolic_bp"},
		{"MDC", "MDC_PRESS_BLD_ART_ABP_MEAN", "mean_arterial_pressure"},
		{"MDC", "150364", "body_temperature"},
		{"MDC", "188452", "body_temperature"},
		{"MDC", "152196", "fio2"},
		{"MDC", "160184", "glucose"},
		{"MDC", "188736", "body_weight"},
		// LOINC: the catalogue's own codes and the table's extras.
		{"LN", "8867-4", "heart_rate"},
		{"LOINC", "59408-5", "spo2"},
		{"http://loinc.org", "2708-6", "spo2"},
		{"urn:oid:2.16.840.1.113883.6.1", "9279-1", "respiratory_rate"},
		{"loinc", "67775-7", "consciousness"},
		{"LN", "8889-8", "heart_rate"},
		// No system: MDC, then LOINC.
		{"", "150456", "spo2"},
		{"", "8310-5", "body_temperature"},
	} {
		got, ok := tb.Metric(tc.system, tc.code)
		if !ok || got != tc.want {
			t.Errorf("Metric(%q, %q) = %q, %v; want %q", tc.system, tc.code, got, ok, tc.want)
		}
	}
	for _, tc := range []struct{ system, code string }{
		{"MDC", "152584"},       // MDC_FLOW_AWAY_EXP_FORCED_PEAK: not a vital sign
		{"MDC", "150388"},       // skin temperature: left out on purpose
		{"MDC", "MDC_NO_SUCH"},  // unknown reference id
		{"MDC", "99999999999"},  // not 32-bit
		{"MDC", ""},             // empty
		{"LN", "1554-5"},        // a lab code
		{"LN", "150456"},        // MDC code under LOINC
		{"SNOMED", "364075005"}, // unknown system
		{"UCUM", "/min"},        // a unit system is not an observation system
	} {
		if got, ok := tb.Metric(tc.system, tc.code); ok {
			t.Errorf("Metric(%q, %q) = %q, want no mapping", tc.system, tc.code, got)
		}
	}
}

func TestUnitLookups(t *testing.T) {
	tb := Default()
	for _, tc := range []struct{ system, code, want string }{
		{"MDC", "262688", "%"},
		{"MDC", "MDC_DIM_PERCENT", "%"},
		{"MDC", "264864", "/min"},
		{"MDC", "264928", "/min"},
		{"MDC", "266016", "mm[Hg]"},
		{"MDC", "265987", "kPa"},
		{"MDC", "268192", "Cel"},
		{"MDC", "266560", "[degF]"},
		{"MDC", "MDC_DIM_FAHR", "[degF]"},
		{"MDC", "265216", "L/min"},
		{"MDC", "MDC_DIM_L_PER_MIN", "L/min"},
		{"UCUM", "bpm", "/min"},
		{"UCUM", "BPM", "/min"},
		{"UCUM", "/min", "/min"},
		{"UCUM", "degF", "[degF]"},
		{"UCUM", "[degF]", "[degF]"},
		{"UCUM", "mmHg", "mm[Hg]"},
		{"UCUM", "MMHG", "mm[Hg]"},
		{"UCUM", "%", "%"},
		{"UCUM", "Cel", "Cel"},
		{"UCUM", "kPa", "kPa"},
		{"UCUM", "L/min", "L/min"},
		{"UCUM", "1", "1"},
		{"http://unitsofmeasure.org", "mm[Hg]", "mm[Hg]"},
		{"", "mmHg", "mm[Hg]"},
		{"", "266016", "mm[Hg]"},
		{"", "MDC_DIM_MMHG", "mm[Hg]"},
	} {
		got, ok := tb.Unit(tc.system, tc.code)
		if !ok || got != tc.want {
			t.Errorf("Unit(%q, %q) = %q, %v; want %q", tc.system, tc.code, got, ok, tc.want)
		}
	}
	for _, tc := range []struct{ system, code string }{
		{"MDC", "268224"}, // conflicting MDC_DIM_DEGF: left out
		{"UCUM", "furlong/fortnight"},
		{"UCUM", ""},
		{"LN", "%"},
	} {
		if got, ok := tb.Unit(tc.system, tc.code); ok {
			t.Errorf("Unit(%q, %q) = %q, want no mapping", tc.system, tc.code, got)
		}
	}
}

// TestTablesAgreeWithCatalogue: every UCUM unit the tables produce is one the
// catalogue converts for at least one metric, and the vital signs a bedside
// monitor measures each have MDC codes.
func TestTablesAgreeWithCatalogue(t *testing.T) {
	cat := catalog.Default()
	tb := Default()
	convertible := map[string]bool{}
	for _, id := range cat.IDs() {
		m, _ := cat.Lookup(id)
		convertible[m.Unit] = true
		for _, u := range m.Units {
			convertible[u.UCUM] = true
		}
	}
	for c, u := range tb.mdcUnit {
		if !convertible[u] {
			t.Errorf("MDC unit %d maps to %q, which no catalogue metric accepts", c, u)
		}
	}
	for alias, u := range tb.ucumUnit {
		if !convertible[u] {
			t.Errorf("UCUM alias %q maps to %q, which no catalogue metric accepts", alias, u)
		}
	}
	covered := map[string]bool{}
	for _, id := range tb.mdcMetric {
		covered[id] = true
	}
	for _, id := range []string{"heart_rate", "spo2", "respiratory_rate", "body_temperature", "systolic_bp",
		"diastolic_bp", "mean_arterial_pressure", "fio2", "glucose", "body_weight"} {
		if !covered[id] {
			t.Errorf("metric %s has no MDC code", id)
		}
	}
	// Conversions the ingest paths rely on (°F, kPa, fraction).
	for _, tc := range []struct {
		metric, unitSystem, unit string
		in, want                 float64
	}{
		{"body_temperature", "MDC", "266560", 98.6, 37},
		{"systolic_bp", "UCUM", "kPa", 16, 120.0098521353},
		{"spo2", "UCUM", "{fraction}", 0.97, 97},
		{"heart_rate", "UCUM", "bpm", 72, 72},
	} {
		u, ok := tb.Unit(tc.unitSystem, tc.unit)
		if !ok {
			t.Fatalf("unit %s %s unmapped", tc.unitSystem, tc.unit)
		}
		m, _ := cat.Lookup(tc.metric)
		got, _, err := m.Normalize(tc.in, u)
		if err != nil || got-tc.want > 1e-6 || tc.want-got > 1e-6 {
			t.Errorf("%s %g %s (%s): got %v, %v; want %v", tc.metric, tc.in, tc.unit, u, got, err, tc.want)
		}
	}
}

// TestFHIRSatO2Example: every coding of the FHIR R4 example Observation
// satO2 (LOINC 2708-6, 59408-5, MDC 150456) maps to spo2 and its unit to %.
func TestFHIRSatO2Example(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join(testenv.Dataset(t, "fhir-r4-observations"), "Observation-satO2.json"))
	if err != nil {
		t.Fatal(err)
	}
	var obs struct {
		Code struct {
			Coding []struct{ System, Code string }
		}
		ValueQuantity struct{ System, Code string }
	}
	if err := json.Unmarshal(doc, &obs); err != nil {
		t.Fatal(err)
	}
	tb := Default()
	if len(obs.Code.Coding) != 3 {
		t.Fatalf("example has %d codings, want 3", len(obs.Code.Coding))
	}
	for _, c := range obs.Code.Coding {
		if id, ok := tb.Metric(c.System, c.Code); !ok || id != "spo2" {
			t.Errorf("coding %s|%s maps to %q, %v; want spo2", c.System, c.Code, id, ok)
		}
	}
	if u, ok := tb.Unit(obs.ValueQuantity.System, obs.ValueQuantity.Code); !ok || u != "%" {
		t.Errorf("unit %s|%s maps to %q, %v", obs.ValueQuantity.System, obs.ValueQuantity.Code, u, ok)
	}
}

func writeFile(t *testing.T, dir, name, text string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestOverlayExtendsAndOverrides(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "10-site.yaml", `version: 1
metrics:
  # A vendor code the hospital's monitors send.
  - {system: MDC, code: "150388", ref: MDC_TEMP_SKIN, metric: body_temperature}
  # Override: this site's "MDC_PULS_RATE" is really the SpO2 (a broken gateway).
  - {system: MDC, code: "149514", metric: spo2}
  - {system: LN, code: 8328-7, metric: body_temperature}
units:
  - {system: UCUM, code: "beats per minute", ucum: /min}
`)
	if _, err := Load(dir); err == nil || !strings.Contains(err.Error(), "10-site.yaml:9") {
		t.Fatalf("a unit code with spaces: got %v, want an error at 10-site.yaml:9", err)
	}
	writeFile(t, dir, "10-site.yaml", `version: 1
metrics:
  - {system: MDC, code: "150388", ref: MDC_TEMP_SKIN, metric: body_temperature}
  - {system: MDC, code: "149514", metric: spo2}
  - {system: LN, code: 8328-7, metric: body_temperature}
units:
  - {system: UCUM, code: "b/min", ucum: /min}
`)
	writeFile(t, dir, "20-later.yml", `version: 1
metrics:
  - {system: MDC, code: "150388", metric: heart_rate}
`)
	writeFile(t, dir, "README.txt", "not a mapping file")
	tb, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ system, code, want string }{
		{"MDC", "150388", "heart_rate"}, // 20-later overrides 10-site
		{"MDC", "MDC_TEMP_SKIN", "heart_rate"},
		{"MDC", "149514", "spo2"},
		{"MDC", "150456", "spo2"}, // defaults still there
		{"LN", "8328-7", "body_temperature"},
	} {
		if got, ok := tb.Metric(tc.system, tc.code); !ok || got != tc.want {
			t.Errorf("Metric(%s, %s) = %q, %v; want %q", tc.system, tc.code, got, ok, tc.want)
		}
	}
	if u, ok := tb.Unit("UCUM", "b/min"); !ok || u != "/min" {
		t.Errorf("overlay unit alias: got %q, %v", u, ok)
	}
	if files := tb.Files(); len(files) != 3 || files[0] != DefaultsName || !strings.HasSuffix(files[2], "20-later.yml") {
		t.Errorf("files = %v", files)
	}
	if got, _ := Default().Metric("MDC", "149514"); got != "heart_rate" {
		t.Errorf("an overlay changed the defaults: %q", got)
	}
}

func TestLoadErrorsNameFileAndLine(t *testing.T) {
	for _, tc := range []struct{ name, doc, want string }{
		{"unknown metric", "version: 1\nmetrics:\n  - {system: MDC, code: \"1\", metric: heart_rat}\n", ":3: metrics[0]: metric \"heart_rat\" is not in the catalogue"},
		{"bad system", "version: 1\nmetrics:\n  - {system: SNOMED, code: \"1\", metric: spo2}\n", ":3: metrics[0]: system \"SNOMED\""},
		{"bad MDC code", "version: 1\nmetrics:\n\n  - {system: MDC, code: 15a, metric: spo2}\n", ":4: metrics[0]: MDC code \"15a\" is not a number"},
		{"bad LOINC", "version: 1\nmetrics:\n  - {system: LN, code: \"8867\", metric: heart_rate}\n", ":3: metrics[0]: LOINC code \"8867\""},
		{"unknown key", "version: 1\nmetrics:\n  - {system: LN, code: 8867-4, metric: heart_rate, colour: red}\n", ":3: "},
		{"bad yaml", "version: 1\nmetrics: [\n", "invalid YAML"},
		{"version", "version: 2\n", ":1: version 2"},
		{"bad ucum", "version: 1\nunits:\n  - {system: MDC, code: \"262688\", ucum: \"\"}\n", ":3: units[0]: ucum \"\""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, dir, "site.yaml", tc.doc)
			_, err := Load(dir)
			if err == nil || !strings.Contains(err.Error(), "site.yaml") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error naming site.yaml and %q", err, tc.want)
			}
		})
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("a missing folder was accepted")
	}
	empty := t.TempDir()
	writeFile(t, empty, "empty.yaml", "")
	if _, err := Load(empty); err != nil {
		t.Errorf("an empty file: %v", err)
	}
}

func TestLoadCatalogChecksAgainstGivenCatalogue(t *testing.T) {
	cat, err := catalog.Parse([]byte("version: 1\nmetrics:\n  - {id: etco2, loinc: 19889-5, unit: \"mm[Hg]\", range: [0, 150]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	writeFile(t, dir, "co2.yaml", "version: 1\nmetrics:\n  - {system: MDC, code: \"151708\", ref: MDC_CONC_AWAY_CO2_ET, metric: etco2}\n")
	tb, err := LoadCatalog(dir, cat)
	if err != nil {
		t.Fatal(err)
	}
	if id, ok := tb.Metric("MDC", "151708"); !ok || id != "etco2" {
		t.Errorf("etco2 code: got %q, %v", id, ok)
	}
	// The defaults' codes of metrics this catalogue lacks stay unmapped.
	if id, ok := tb.Metric("MDC", "147842"); ok {
		t.Errorf("heart rate code mapped to %q without heart_rate in the catalogue", id)
	}
	if _, err := Load(dir); err == nil || !strings.Contains(err.Error(), "co2.yaml:3") {
		t.Fatalf("got %v, want etco2 refused against the embedded catalogue", err)
	}
}
