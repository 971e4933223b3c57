package fhir

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func vital(loinc string, value float64, unit, when, extra string) string {
	return fmt.Sprintf(`{"resourceType":"Observation","status":"final",
	 "category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],
	 "code":{"coding":[{"system":"http://loinc.org","code":%q}]},
	 "subject":{"reference":"Patient/p-1"},"device":{"reference":"Device/bed-7"},
	 "effectiveDateTime":%q,
	 "valueQuantity":{"value":%v,"unit":%q,"system":"http://unitsofmeasure.org","code":%q}%s}`, loinc, when, value, unit, unit, extra)
}

func entry(fullURL, resource string) string {
	return fmt.Sprintf(`{"fullUrl":%q,"resource":%s,"request":{"method":"POST","url":"Observation"}}`, fullURL, resource)
}

func bundleOf(typ string, entries ...string) []byte {
	return []byte(fmt.Sprintf(`{"resourceType":"Bundle","type":%q,"entry":[%s]}`, typ, strings.Join(entries, ",\n")))
}

// TestBundleBatchAndTransaction posts batch and transaction Bundles with good
// and bad entries over real HTTP and checks the answers against what lands
// on the samples and dead-letter topics of a real broker.
func TestBundleBatchAndTransaction(t *testing.T) {
	e := start(t, "", nil, Options{})
	now := time.Now().UTC().Truncate(time.Second)
	t1 := now.Add(-time.Minute).Format(time.RFC3339)
	t2 := now.Add(-2 * time.Minute).In(time.FixedZone("", -4*3600)).Format("2006-01-02T15:04:05.000-07:00")
	bp := fmt.Sprintf(`{"resourceType":"Observation","status":"final",
	 "code":{"coding":[{"system":"http://loinc.org","code":"85354-9"}]},
	 "subject":{"reference":"Patient/p-1"},"effectiveDateTime":%q,
	 "component":[
	  {"code":{"coding":[{"system":"http://loinc.org","code":"8480-6"}]},"valueQuantity":{"value":16,"system":"http://unitsofmeasure.org","code":"kPa"}},
	  {"code":{"coding":[{"system":"http://loinc.org","code":"8462-4"}]},"valueQuantity":{"value":80,"system":"http://unitsofmeasure.org","code":"mm[Hg]"}}]}`, t2)
	mdcSpO2 := fmt.Sprintf(`{"resourceType":"Observation","status":"final",
	 "code":{"coding":[{"system":"urn:iso:std:iso:11073:10101","code":"150456"}]},
	 "subject":{"identifier":{"system":"urn:mrn","value":"mrn-42"}},"device":{"reference":"Device/oxi-1"},
	 "effectivePeriod":{"start":%q},
	 "valueQuantity":{"value":0.93,"system":"http://unitsofmeasure.org","code":"1"}}`, t1)
	lab := `{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"2345-7","display":"Glucose [Mass/volume] in Serum or Plasma"}]},
	 "subject":{"reference":"Patient/p-1"},"effectiveDateTime":"2024-01-01T10:00:00Z","valueQuantity":{"value":5,"system":"http://unitsofmeasure.org","code":"mmol/L"}}`
	panel := fmt.Sprintf(`{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"85353-1"}]},
	 "subject":{"reference":"Patient/p-1"},"effectiveDateTime":%q,
	 "hasMember":[{"reference":"urn:uuid:hr"},{"reference":"urn:uuid:bp"}]}`, t1)
	contained := fmt.Sprintf(`{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"85353-1"}]},
	 "contained":[{"resourceType":"Observation","id":"rr","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"9279-1"}]},
	   "valueQuantity":{"value":18,"system":"http://unitsofmeasure.org","code":"/min"}}],
	 "subject":{"reference":"Patient/p-2"},"effectiveDateTime":%q,"hasMember":[{"reference":"#rr"}]}`, t1)

	body := bundleOf("batch",
		entry("urn:uuid:hr", vital("8867-4", 72, "/min", t1, "")),     // 0 ok
		entry("urn:uuid:bp", bp),                                      // 1 ok, 2 samples
		entry("urn:uuid:lab", lab),                                    // 2 not a vital sign
		entry("urn:uuid:unit", vital("8310-5", 37, "mm[Hg]", t1, "")), // 3 unit
		entry("urn:uuid:str", strings.Replace(vital("8867-4", 1, "/min", t1, ""), `"value":1`, `"value":"fast"`, 1)), // 4 malformed
		`{"resource":`+vital("8867-4", 70, "/min", t1, "")+`,"request":{"method":"DELETE","url":"Observation/x"}}`,   // 5 method
		entry("urn:uuid:spo2", mdcSpO2),                                                  // 6 ok via MDC
		entry("urn:uuid:panel", panel),                                                   // 7 grouping
		entry("urn:uuid:contained", contained),                                           // 8 contained member
		entry("urn:uuid:notime", vital("8867-4", 70, "/min", "2024-01-01T10:00:00", "")), // 9 no zone
	)
	resp, out := post(t, e.url, body, map[string]string{"X-Vigil-Tenant": "st-mary"})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, out)
	}
	var rb Bundle
	if err := json.Unmarshal(out, &rb); err != nil || rb.Type != "batch-response" || len(rb.Entry) != 10 {
		t.Fatalf("response %v: %s", err, out)
	}
	want := []struct {
		status, reason, expr string
	}{
		{"201 Created", "", ""},
		{"201 Created", "", ""},
		{"422 Unprocessable Entity", "not_vital_sign", "Bundle.entry[2].resource.code"},
		{"422 Unprocessable Entity", "unit_not_convertible", "Bundle.entry[3].resource.valueQuantity.code"},
		{"400 Bad Request", "malformed_message", "Bundle.entry[4].resource.valueQuantity.value"},
		{"400 Bad Request", "unsupported_message", "Bundle.entry[5].request.method"},
		{"201 Created", "", ""},
		{"200 OK", "", ""},
		{"201 Created", "", ""},
		{"422 Unprocessable Entity", "invalid_time", "Bundle.entry[9].resource.effectiveDateTime"},
	}
	ids := map[string]int{}
	for i, w := range want {
		r := rb.Entry[i].Response
		if r == nil || r.Status != w.status {
			t.Errorf("entry %d: response %+v, want %s", i, r, w.status)
			continue
		}
		if w.reason != "" {
			if r.Outcome == nil || r.Outcome.Issue[0].Reason() != w.reason || r.Outcome.Issue[0].Expression[0] != w.expr || r.Outcome.Issue[0].Diagnostics == "" {
				t.Errorf("entry %d: outcome %+v, want %s at %s", i, r.Outcome, w.reason, w.expr)
			}
		}
		if w.status == "201 Created" {
			id := strings.TrimSuffix(strings.TrimPrefix(r.Location, "Observation/"), "/_history/1")
			if id == r.Location || id == "" {
				t.Errorf("entry %d: location %q", i, r.Location)
			}
			ids[id] = i
		}
	}

	// Transaction, all good: published.
	okTx := bundleOf("transaction",
		entry("urn:uuid:a", vital("9279-1", 20, "/min", t1, "")),
		entry("urn:uuid:b", vital("59408-5", 96, "%", t1, "")))
	resp, out = post(t, e.url, okTx, map[string]string{"X-Vigil-Tenant": "st-mary"})
	if err := json.Unmarshal(out, &rb); err != nil || resp.StatusCode != http.StatusOK || rb.Type != "transaction-response" || len(rb.Entry) != 2 {
		t.Fatalf("transaction: status %d %v: %s", resp.StatusCode, err, out)
	}
	for i, en := range rb.Entry {
		if en.Response.Status != "201 Created" {
			t.Errorf("transaction entry %d: %+v", i, en.Response)
		}
		ids[strings.TrimSuffix(strings.TrimPrefix(en.Response.Location, "Observation/"), "/_history/1")] = 100 + i
	}

	// Transaction with one bad entry: nothing published.
	badTx := bundleOf("transaction",
		entry("urn:uuid:c", vital("8867-4", 88, "/min", t1, "")),
		entry("urn:uuid:d", vital("8867-4", 900, "/min", t1, "")))
	resp, out = post(t, e.url, badTx, map[string]string{"X-Vigil-Tenant": "st-mary"})
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("bad transaction: status %d: %s", resp.StatusCode, out)
	}
	oo := outcome(t, out)
	if oo.Issue[0].Reason() != "out_of_range" || oo.Issue[0].Expression[0] != "Bundle.entry[1].resource.valueQuantity.value" ||
		!strings.Contains(oo.Issue[len(oo.Issue)-1].Diagnostics, "none was accepted") {
		t.Errorf("bad transaction outcome: %s", out)
	}

	// What is on Kafka is exactly what was answered.
	batches := samplesByTenant(t, e)["st-mary"]
	type got struct {
		patient, device string
		samples         []*vigilv1.Sample
	}
	byID := map[string]got{}
	for _, b := range batches {
		if _, dup := byID[b.MessageId]; dup {
			t.Errorf("two batches for %s", b.MessageId)
		}
		byID[b.MessageId] = got{b.Patient, b.Device, b.Samples}
	}
	if len(byID) != len(ids) {
		t.Errorf("%d batches on the topic for %d created entries", len(byID), len(ids))
	}
	check := func(entry int, patient, device string, metrics []string, values []float64, at string) {
		t.Helper()
		for id, i := range ids {
			if i != entry {
				continue
			}
			g, ok := byID[id]
			if !ok {
				t.Errorf("entry %d (%s) answered 201 but is not on the topic", entry, id)
				return
			}
			if g.patient != patient || g.device != device || len(g.samples) != len(metrics) {
				t.Errorf("entry %d: %s/%s %v", entry, g.patient, g.device, g.samples)
				return
			}
			for k, s := range g.samples {
				if s.Metric != metrics[k] || math.Abs(s.Value-values[k]) > 1e-6 || s.EventTimeMs != ms(t, at) {
					t.Errorf("entry %d sample %d: %v, want %s %v at %s", entry, k, s, metrics[k], values[k], at)
				}
			}
			return
		}
		t.Errorf("entry %d was not created", entry)
	}
	check(0, "p-1", "bed-7", []string{"heart_rate"}, []float64{72}, t1)
	check(1, "p-1", "fhir", []string{"systolic_bp", "diastolic_bp"}, []float64{120.0098521, 80}, t2)
	check(6, "mrn-42", "oxi-1", []string{"spo2"}, []float64{93}, t1)
	check(8, "p-2", "fhir", []string{"respiratory_rate"}, []float64{18}, t1)
	check(100, "p-1", "bed-7", []string{"respiratory_rate"}, []float64{20}, t1)
	check(101, "p-1", "bed-7", []string{"spo2"}, []float64{96}, t1)

	letters := lettersByTenant(t, e)["st-mary"]
	var reasons []string
	for _, d := range letters {
		reasons = append(reasons, d.Reason+"@"+d.Field)
		if len(d.Raw) == 0 || !json.Valid(d.Raw) && d.Reason != "malformed_message" {
			t.Errorf("dead letter %s: raw %q", d.Reason, d.Raw)
		}
	}
	wantReasons := "not_vital_sign@Bundle.entry[2].resource.code unit_not_convertible@Bundle.entry[3].resource.valueQuantity.code " +
		"malformed_message@Bundle.entry[4].resource.valueQuantity.value unsupported_message@Bundle.entry[5].request.method " +
		"invalid_time@Bundle.entry[9].resource.effectiveDateTime out_of_range@Bundle.entry[1].resource.valueQuantity.value"
	if strings.Join(reasons, " ") != wantReasons {
		t.Errorf("dead letters\n %s\nwant\n %s", strings.Join(reasons, " "), wantReasons)
	}
}
