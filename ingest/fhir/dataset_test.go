package fhir

import (
	"fmt"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

type wantSample struct {
	metric string
	value  float64
	unit   string
	time   string // RFC 3339
}

// datasetCase is the expected answer to one example file, values read by
// hand from the file.
type datasetCase struct {
	file string
	// samples are what a server with fhir.accept_date_only becomes (nil
	// when the resource is refused).
	samples []wantSample
	patient string
	device  string
	// reason is the refusal reason of the resource (with
	// fhir.accept_date_only); for an accepted resource, the reason of a
	// refused part ("" when none).
	reason string
	// expr is the FHIRPath the refusal names (checked when set).
	expr string
	// says is a fragment the refusal's diagnostics must contain.
	says string
	// dateOnly: the effective time is a day without time, so the default
	// server refuses the resource with invalid_time.
	dateOnly bool
}

const dayNote = "has day precision only"

var datasetCases = []datasetCase{
	// Vital signs that become samples.
	{file: "Observation-heart-rate.json", samples: []wantSample{{"heart_rate", 44, "/min", "1999-07-02T00:00:00Z"}},
		patient: "example", device: "fhir", dateOnly: true},
	{file: "Observation-respiratory-rate.json", samples: []wantSample{{"respiratory_rate", 26, "/min", "1999-07-02T00:00:00Z"}},
		patient: "example", device: "fhir", dateOnly: true},
	{file: "Observation-body-temperature.json", samples: []wantSample{{"body_temperature", 36.5, "Cel", "1999-07-02T00:00:00Z"}},
		patient: "example", device: "fhir", dateOnly: true},
	{file: "Observation-blood-pressure.json", samples: []wantSample{
		{"systolic_bp", 107, "mm[Hg]", "2012-09-17T00:00:00Z"}, {"diastolic_bp", 60, "mm[Hg]", "2012-09-17T00:00:00Z"}},
		patient: "example", device: "fhir", dateOnly: true},
	{file: "Observation-blood-pressure-dar.json", samples: []wantSample{{"systolic_bp", 107, "mm[Hg]", "2012-09-17T00:00:00Z"}},
		patient: "example", device: "fhir", dateOnly: true,
		reason: "absent_value", expr: "Observation.component[1].dataAbsentReason", says: "not-performed"},
	{file: "Observation-mbp.json", samples: []wantSample{{"mean_arterial_pressure", 80, "mm[Hg]", "1999-07-02T00:00:00Z"}},
		patient: "example", device: "fhir", dateOnly: true},
	// Body weight 185 [lb_av] = 83.91458845 kg.
	{file: "Observation-example.json", samples: []wantSample{{"body_weight", 83.91458845, "kg", "2016-03-28T00:00:00Z"}},
		patient: "example", device: "fhir", dateOnly: true},
	// 2014-12-05T09:30:10+01:00; device DeviceMetric/example.
	{file: "Observation-satO2.json", samples: []wantSample{{"spo2", 95, "%", "2014-12-05T08:30:10Z"}},
		patient: "example", device: "example"},
	// Mean arterial pressure (category laboratory, but a vital sign by
	// code), effectivePeriod.start 2018-04-02T10:30:10+01:00.
	{file: "Observation-map-sitting.json", samples: []wantSample{{"mean_arterial_pressure", 60, "mm[Hg]", "2018-04-02T09:30:10Z"}},
		patient: "example", device: "fhir"},

	// Vital signs refused.
	{file: "Observation-vitals-panel.json", reason: "unsupported_message", expr: "Observation.hasMember[0]",
		says: `"Observation/respiratory-rate" is not in this request`, dateOnly: true},
	{file: "Observation-blood-pressure-cancel.json", reason: "absent_value", expr: "Observation.status", says: "cancelled"},
	{file: "Observation-f202.json", reason: "absent_value", expr: "Observation.status", says: "entered-in-error"},
	{file: "Observation-body-height.json", reason: "unknown_metric", expr: "Observation.code", says: "LOINC 8302-2"},
	{file: "Observation-body-length.json", reason: "unknown_metric", expr: "Observation.code", says: "LOINC 8302-2"},
	{file: "Observation-bmi.json", reason: "unknown_metric", expr: "Observation.code", says: "LOINC 39156-5"},
	{file: "Observation-bmi-using-related.json", reason: "unknown_metric", expr: "Observation.code", says: "LOINC 39156-5"},
	{file: "Observation-head-circumference.json", reason: "unknown_metric", expr: "Observation.code", says: "LOINC 9843-4"},
	// Device codes without a mapping.
	{file: "Observation-656.json", reason: "unmapped_code", expr: "Observation.code.coding", says: "MDC code 152584 (MDC_FLOW_AWAY_EXP_FORCED_PEAK)"},
	{file: "Observation-ekg.json", reason: "unmapped_code", expr: "Observation.code.coding", says: "MDC code 131328"},

	// Not vital signs.
	{file: "Observation-10minute-apgar-score.json", reason: "not_vital_sign", says: "LOINC 9271-8"},
	{file: "Observation-1minute-apgar-score.json", reason: "not_vital_sign", says: "LOINC 9272-6"},
	{file: "Observation-20minute-apgar-score.json", reason: "not_vital_sign", says: "443849008"},
	{file: "Observation-2minute-apgar-score.json", reason: "not_vital_sign", says: "LOINC 9273-4"},
	{file: "Observation-5minute-apgar-score.json", reason: "not_vital_sign", says: "LOINC 9274-2"},
	{file: "Observation-abdo-tender.json", reason: "not_vital_sign", says: "category exam"},
	{file: "Observation-alcohol-type.json", reason: "not_vital_sign", says: "category social-history"},
	{file: "Observation-bgpanel.json", reason: "not_vital_sign", says: "category laboratory"},
	{file: "Observation-bloodgroup.json", reason: "not_vital_sign", says: "LOINC 883-9"},
	{file: "Observation-bmd.json", reason: "not_vital_sign", says: "LOINC 24701-5"},
	{file: "Observation-clinical-gender.json", reason: "not_vital_sign", says: "LOINC 76691-5"},
	{file: "Observation-date-lastmp.json", reason: "not_vital_sign", says: "LOINC 8665-2"},
	{file: "Observation-decimal.json", reason: "not_vital_sign", says: `only the text "Decimal Testing Observation"`},
	{file: "Observation-example-TPMT-diplotype.json", reason: "not_vital_sign", says: "363779003"},
	{file: "Observation-example-TPMT-haplotype-one.json", reason: "absent_value", expr: "Observation.status", says: "status is unknown"},
	{file: "Observation-example-TPMT-haplotype-two.json", reason: "absent_value", expr: "Observation.status", says: "status is unknown"},
	{file: "Observation-example-diplotype1.json", reason: "not_vital_sign", says: "363779003"},
	{file: "Observation-example-genetics-1.json", reason: "not_vital_sign", says: "LOINC 55233-1"},
	{file: "Observation-example-genetics-2.json", reason: "not_vital_sign", says: "LOINC 55233-1"},
	{file: "Observation-example-genetics-3.json", reason: "not_vital_sign", says: `"Further analysis"`},
	{file: "Observation-example-genetics-4.json", reason: "not_vital_sign", says: `"Allele ABC"`},
	{file: "Observation-example-genetics-5.json", reason: "not_vital_sign", says: `"PCR validation"`},
	{file: "Observation-example-genetics-brcapat.json", reason: "not_vital_sign", says: "LOINC 59041-4"},
	{file: "Observation-example-haplotype1.json", reason: "absent_value", expr: "Observation.status", says: "status is unknown"},
	{file: "Observation-example-haplotype2.json", reason: "absent_value", expr: "Observation.status", says: "status is unknown"},
	{file: "Observation-example-phenotype.json", reason: "not_vital_sign", says: "LOINC 79716-7"},
	{file: "Observation-eye-color.json", reason: "not_vital_sign", says: `"eye color"`},
	{file: "Observation-f001.json", reason: "not_vital_sign", says: "LOINC 15074-8"},
	{file: "Observation-f002.json", reason: "not_vital_sign", says: "LOINC 11555-0"},
	{file: "Observation-f003.json", reason: "not_vital_sign", says: "LOINC 11557-6"},
	{file: "Observation-f004.json", reason: "not_vital_sign", says: "LOINC 789-8"},
	{file: "Observation-f005.json", reason: "not_vital_sign", says: "LOINC 718-7"},
	{file: "Observation-f203.json", reason: "not_vital_sign", says: "LOINC 1963-8"},
	{file: "Observation-f204.json", reason: "not_vital_sign", says: "20005"},
	{file: "Observation-f205.json", reason: "not_vital_sign", says: "LOINC 33914-3"},
	{file: "Observation-f206.json", reason: "not_vital_sign", says: "104177"},
	{file: "Observation-gcs-qa.json", reason: "not_vital_sign", says: "LOINC 9269-2"},
	{file: "Observation-glasgow.json", reason: "not_vital_sign", says: "LOINC 9269-2"},
	{file: "Observation-herd1.json", reason: "not_vital_sign", says: "category laboratory"},
	{file: "Observation-rhstatus.json", reason: "not_vital_sign", says: "LOINC 883-9"},
	{file: "Observation-secondsmoke.json", reason: "not_vital_sign", says: "category social-history"},
	{file: "Observation-trachcare.json", reason: "not_vital_sign", says: "category exam"},
	{file: "Observation-unsat.json", reason: "absent_value", expr: "Observation.status", says: "cancelled"},
	{file: "Observation-vomiting.json", reason: "not_vital_sign", says: "LOINC 45708-5"},
	{file: "Observation-vp-oyster.json", reason: "not_vital_sign", says: "LOINC 41857-4"},
}

// TestDatasetObservations posts each of the 64 R4 examples to a real HTTP
// server, once with the defaults (a day without time refused) and once
// with fhir.accept_date_only, and checks the answer, the samples on Kafka
// and the dead letters against the table.
func TestDatasetObservations(t *testing.T) {
	dir := testenv.Dataset(t, "fhir-r4-observations")
	files, err := filepath.Glob(filepath.Join(dir, "Observation-*.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 64 || len(datasetCases) != 64 {
		t.Fatalf("%d files, %d cases: want 64 of each", len(files), len(datasetCases))
	}
	covered := map[string]bool{}
	for _, c := range datasetCases {
		covered[c.file] = true
	}
	for _, f := range files {
		if !covered[filepath.Base(f)] {
			t.Errorf("no expectation for %s", filepath.Base(f))
		}
	}
	broker := testenv.Kafka(t)
	strict := start(t, broker, nil, Options{})
	lenient := start(t, broker, func(c *config.Config) { c.FHIR.AcceptDateOnly = true }, Options{})

	type posted struct {
		c               datasetCase
		strict, lenient string // tenants
	}
	var all []posted
	for i, c := range datasetCases {
		body, err := os.ReadFile(filepath.Join(dir, c.file))
		if err != nil {
			t.Fatal(err)
		}
		p := posted{c: c, strict: fmt.Sprintf("strict-%d", i), lenient: fmt.Sprintf("lenient-%d", i)}
		all = append(all, p)
		t.Run(strings.TrimSuffix(c.file, ".json"), func(t *testing.T) {
			// Lenient server.
			resp, out := post(t, lenient.url+"/Observation", body, map[string]string{"X-Vigil-Tenant": p.lenient, "Prefer": "return=OperationOutcome"})
			checkAnswer(t, resp, out, c, c.samples != nil, c.reason, c.expr, c.says)
			// Default server.
			resp, out = post(t, strict.url+"/Observation", body, map[string]string{"X-Vigil-Tenant": p.strict})
			if c.dateOnly {
				checkAnswer(t, resp, out, c, false, "invalid_time", "", dayNote)
			} else if c.samples != nil {
				if resp.StatusCode != http.StatusCreated || resp.Header.Get("Location") == "" {
					t.Errorf("default server: status %d, Location %q: %s", resp.StatusCode, resp.Header.Get("Location"), out)
				}
			} else {
				checkAnswer(t, resp, out, c, false, c.reason, c.expr, c.says)
			}
		})
	}

	samples := samplesByTenant(t, strict)
	letters := lettersByTenant(t, strict)
	for _, p := range all {
		c := p.c
		// Lenient: exactly the samples of the table.
		checkSamples(t, c.file+" (accept_date_only)", samples[p.lenient], c, true)
		wantLetters := 0
		if c.reason != "" {
			wantLetters = 1
		}
		checkLetters(t, c.file+" (accept_date_only)", letters[p.lenient], wantLetters, c.reason)
		// Default.
		switch {
		case c.dateOnly:
			checkSamples(t, c.file, samples[p.strict], datasetCase{}, false)
			checkLetters(t, c.file, letters[p.strict], 1, "invalid_time")
		default:
			checkSamples(t, c.file, samples[p.strict], c, false)
			checkLetters(t, c.file, letters[p.strict], wantLetters, c.reason)
		}
	}
}

func checkAnswer(t *testing.T, resp *http.Response, out []byte, c datasetCase, accepted bool, reason, expr, says string) {
	t.Helper()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, ContentType) {
		t.Errorf("Content-Type %q", ct)
	}
	oo := outcome(t, out)
	if accepted {
		if resp.StatusCode != http.StatusCreated || resp.Header.Get("Location") == "" {
			t.Fatalf("status %d, Location %q, want 201: %s", resp.StatusCode, resp.Header.Get("Location"), out)
		}
		if oo.Issue[0].Severity != "information" || !strings.Contains(oo.Issue[0].Diagnostics, fmt.Sprintf("accepted %d sample", len(c.samples))) {
			t.Errorf("outcome %s", out)
		}
		if reason != "" {
			found := false
			for _, is := range oo.Issue {
				if is.Severity == "warning" && is.Reason() == reason && strings.Contains(is.Diagnostics, says) &&
					(expr == "" || len(is.Expression) == 1 && is.Expression[0] == expr) {
					found = true
				}
			}
			if !found {
				t.Errorf("no warning %s at %s saying %q: %s", reason, expr, says, out)
			}
		}
		return
	}
	if resp.StatusCode != http.StatusBadRequest && resp.StatusCode != http.StatusUnprocessableEntity {
		t.Fatalf("status %d, want 400 or 422: %s", resp.StatusCode, out)
	}
	is := oo.Issue[0]
	if is.Severity != "error" || is.Reason() != reason || !strings.Contains(is.Diagnostics, says) || is.Code == "" {
		t.Errorf("issue %+v, want reason %s saying %q", is, reason, says)
	}
	if expr != "" && (len(is.Expression) != 1 || is.Expression[0] != expr) {
		t.Errorf("expression %v, want %s", is.Expression, expr)
	}
	if reason == "not_vital_sign" && !strings.Contains(is.Diagnostics, "not a vital sign") {
		t.Errorf("diagnostics %q does not say it is not a vital sign", is.Diagnostics)
	}
}

func checkSamples(t *testing.T, what string, got []*vigilv1.SampleBatch, c datasetCase, lenient bool) {
	t.Helper()
	if len(c.samples) == 0 {
		if len(got) != 0 {
			t.Errorf("%s: %d batches on the samples topic, want none: %v", what, len(got), got)
		}
		return
	}
	if len(got) != 1 {
		t.Fatalf("%s: %d batches, want 1", what, len(got))
	}
	b := got[0]
	if b.Patient != c.patient || b.Device != c.device || b.Source != vigilv1.Source_SOURCE_FHIR || b.MessageId == "" {
		t.Errorf("%s: batch %s/%s/%s source %v id %q, want patient %s device %s", what, b.Tenant, b.Patient, b.Device, b.Source, b.MessageId, c.patient, c.device)
	}
	if len(b.Samples) != len(c.samples) {
		t.Fatalf("%s: %d samples, want %d: %v", what, len(b.Samples), len(c.samples), b.Samples)
	}
	for i, w := range c.samples {
		s := b.Samples[i]
		if s.Metric != w.metric || math.Abs(s.Value-w.value) > 1e-6 || s.Unit != w.unit || s.EventTimeMs != ms(t, w.time) {
			t.Errorf("%s: sample %d = %s %v %s at %d, want %+v", what, i, s.Metric, s.Value, s.Unit, s.EventTimeMs, w)
		}
		questionable := s.Quality&uint32(vigilv1.QualityFlag_QUALITY_QUESTIONABLE) != 0
		if questionable != (lenient && c.dateOnly) {
			t.Errorf("%s: sample %d quality %b: questionable should be %v", what, i, s.Quality, lenient && c.dateOnly)
		}
	}
}

func checkLetters(t *testing.T, what string, got []*vigilv1.DeadLetter, n int, reason string) {
	t.Helper()
	if len(got) != n {
		t.Fatalf("%s: %d dead letters, want %d", what, len(got), n)
	}
	for _, d := range got {
		if d.Reason != reason || d.Message == "" || d.Field == "" || len(d.Raw) == 0 || d.ContentType != ContentType {
			t.Errorf("%s: dead letter reason %s field %q raw %d bytes, want reason %s", what, d.Reason, d.Field, len(d.Raw), reason)
		}
	}
}
