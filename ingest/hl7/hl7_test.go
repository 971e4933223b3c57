package hl7

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/ingest/mapping"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func TestParseStructureAndEscapes(t *testing.T) {
	for _, sep := range []string{"\r", "\n", "\r\n"} {
		msg := strings.Join([]string{
			"MSH|^~\\&|GW|ICU||VIGIL|20240102030405.1234+0100||ORU^R01^ORU_R01|MSG1|P|2.6",
			"PID|||other^^^H^PI~12345^^^H^MR||Doe^Jane",
			`NTE|1||a\F\b\S\c\T\d\R\e\E\f\X41FF\g\.br\h\H\i\N\j\Zx\k|`,
			"OBX|1||||",
			"ZZ1|x",
		}, sep) + sep
		m, err := Parse([]byte(msg))
		if err != nil {
			t.Fatalf("sep %q: %v", sep, err)
		}
		if m.Len() != 5 {
			t.Fatalf("sep %q: %d segments, want 5", sep, m.Len())
		}
		h := ReadHeader(m)
		if h.Type != "ORU" || h.Trigger != "R01" || h.ControlID != "MSG1" || h.Version != "2.6" || h.SendingFacility != "ICU" {
			t.Errorf("header %+v", h)
		}
		if got := m.MSH().Field(1).String(); got != "|" {
			t.Errorf("MSH-1 %q", got)
		}
		if got := m.MSH().Field(2).String(); got != `^~\&` {
			t.Errorf("MSH-2 %q", got)
		}
		pid, _ := m.First("PID")
		if got := PatientID(pid.Field(3)); got != "12345" {
			t.Errorf("patient %q, want the MR identifier 12345", got)
		}
		if n := pid.Field(3).Reps(); n != 2 {
			t.Errorf("PID-3 reps %d", n)
		}
		nte, _ := m.First("NTE")
		want := "a|b^c&d~e\\f" + "A\uFFFD" + "g\nhijk"
		if got := nte.Field(3).String(); got != want {
			t.Errorf("unescaped %q, want %q", got, want)
		}
		if !nte.Field(4).Empty() || !nte.Field(40).Empty() {
			t.Error("empty and absent fields must be empty")
		}
		obx, _ := m.First("OBX")
		if obx.Field(3).Component(2).String() != "" {
			t.Error("empty component")
		}
	}
}

func TestParseCustomDelimiters(t *testing.T) {
	msg := "MSH#*!$%#A#B#C#D#20240101##ORU*R01#1#P#2.5\rPID###id1*x*y*z*MR!id2##n%m\r"
	m, err := Parse([]byte(msg))
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := m.First("PID")
	if got := PatientID(pid.Field(3)); got != "id1" {
		t.Errorf("patient %q", got)
	}
	if got := pid.Field(5).Sub(2).String(); got != "m" {
		t.Errorf("sub-component %q", got)
	}
	if h := ReadHeader(m); h.Type != "ORU" || h.Trigger != "R01" {
		t.Errorf("header %+v", h)
	}
}

func TestParseErrors(t *testing.T) {
	for name, in := range map[string]string{
		"no MSH":          "PID|1\r",
		"short":           "MSH|^",
		"bad delimiter":   "MSHA^~\\&|x\r",
		"repeated enc":    "MSH|^^\\&|x\r",
		"bad segment id":  "MSH|^~\\&|a\rpid|1\r",
		"segment no sep":  "MSH|^~\\&|a\rPIDX\r",
		"two MSH":         "MSH|^~\\&|a\rMSH|^~\\&|b\r",
		"empty":           "",
		"only whitespace": "\r\n\x00  ",
	} {
		if _, err := Parse([]byte(in)); err == nil {
			t.Errorf("%s: parsed %q", name, in)
		} else if _, ok := err.(*ParseError); !ok {
			t.Errorf("%s: error %T, want *ParseError", name, err)
		}
	}
}

func TestParseTime(t *testing.T) {
	for in, want := range map[string]string{
		"2024":                    "2024-01-01T00:00:00Z",
		"202402":                  "2024-02-01T00:00:00Z",
		"20240229":                "2024-02-29T00:00:00Z",
		"2024022913":              "2024-02-29T13:00:00Z",
		"202402291314":            "2024-02-29T13:14:00Z",
		"20240229131415":          "2024-02-29T13:14:15Z",
		"20240229131415.1":        "2024-02-29T13:14:15.1Z",
		"20240229131415.1234":     "2024-02-29T13:14:15.123Z",
		"20240229131415+0200":     "2024-02-29T11:14:15Z",
		"20240229131415.835-0400": "2024-02-29T17:14:15.835Z",
		"201203141259-0215":       "2012-03-14T15:14:00Z",
		"20240229131415^S":        "2024-02-29T13:14:15Z",
		"20020215073000+0600":     "2002-02-15T01:30:00Z",
		"20141006062700+0700":     "2014-10-05T23:27:00Z",
	} {
		got, err := ParseTime([]byte(in), nil)
		if err != nil {
			t.Errorf("%s: %v", in, err)
			continue
		}
		w, _ := time.Parse(time.RFC3339Nano, want)
		if got != w.UnixMilli() {
			t.Errorf("%s: %s, want %s", in, time.UnixMilli(got).UTC(), want)
		}
	}
	for _, in := range []string{"", "20", "2024130", "20240230", "20241301", "2024010112.5", "20240101120000+02", "2024010112000x", "20240101120000.12345"} {
		if _, err := ParseTime([]byte(in), nil); err == nil {
			t.Errorf("%q parsed", in)
		}
	}
}

// datasetMessages reads every message of the HL7 v2 sample data set.
func datasetMessages(t testing.TB) map[string][]byte {
	dir := filepath.Join(testenv.Dataset(t, "hl7v2-samples"), "messages")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = b
	}
	return out
}

func TestDatasetParses(t *testing.T) {
	msgs := datasetMessages(t)
	if len(msgs) != 139 {
		t.Fatalf("%d messages, want 139", len(msgs))
	}
	for name, b := range msgs {
		m, err := Parse(b)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		h := ReadHeader(m)
		if h.Type == "" || h.ControlID == "" || !SupportedVersion(h.Version) {
			t.Errorf("%s: header %+v", name, h)
		}
		// Every field of every segment can be walked.
		for i := 0; i < m.Len(); i++ {
			s := m.Segment(i)
			for f := 1; f <= s.NumFields(); f++ {
				fl := s.Field(f)
				for r := 0; r < fl.Reps(); r++ {
					_ = fl.Rep(r).Component(1).Sub(1).String()
				}
			}
		}
	}
}

func testDecoder(codes Codes) *Decoder {
	return &Decoder{Codes: codes, Validator: validate.New(catalog.Default(), validate.Limits{MaxFutureSkew: 5 * time.Minute, BackfillAge: 24 * time.Hour})}
}

// fhirObs is the part of an expected FHIR Observation compared.
type fhirObs struct {
	Code struct {
		Coding []struct{ Code, System string }
	}
	ValueQuantity *struct {
		Value float64
		Unit  string
		Code  string
	}
	EffectiveDateTime string
}

func expectedObservations(t *testing.T, name string) []fhirObs {
	path := filepath.Join(testenv.Dataset(t, "hl7v2-samples"), "expected-fhir", name+"-expected.json")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var bundle struct {
		Entry []struct {
			Resource json.RawMessage
		}
	}
	if err := json.Unmarshal(b, &bundle); err != nil {
		t.Fatal(err)
	}
	var out []fhirObs
	for _, e := range bundle.Entry {
		var head struct{ ResourceType string }
		_ = json.Unmarshal(e.Resource, &head)
		if head.ResourceType != "Observation" {
			continue
		}
		var o fhirObs
		if err := json.Unmarshal(e.Resource, &o); err != nil {
			t.Fatal(err)
		}
		out = append(out, o)
	}
	return out
}

// localCodes is a hospital's extension of the mapping tables: its lab's
// local code for fasting glucose onto the catalogue's glucose.
type localCodes struct{ Codes }

func (l localCodes) Metric(system, code string) (string, bool) {
	if system == "POST 12H CFST:MCNC:PT:SER/PLAS:QN" && code == "1554-5" {
		return "glucose", true
	}
	return l.Codes.Metric(system, code)
}

// TestDatasetORUAgainstExpectedFHIR decodes every ORU^R01 sample for which
// the data set has the expected FHIR Observations, and checks each numeric
// Observation (valueQuantity) against what Vigil made of its OBX: when the
// code maps onto a Vigil metric, the sample's value, unit and effective
// time; otherwise the refusal and its reason (lab values are not vital
// signs).
func TestDatasetORUAgainstExpectedFHIR(t *testing.T) {
	msgs := datasetMessages(t)
	cases := []struct {
		file, expected string
		codes          Codes
		wantMapped     int
	}{
		{"LAB-ORU-1.hl7", "LAB-ORU-1", mapping.Default(), 0},
		{"LAB-ORU-2.hl7", "LAB-ORU-2", mapping.Default(), 0},
		{"LRI_2.0-NG_CBC_Typ_Message.hl7", "LRI_2.0-NG_CBC_Typ_Message", mapping.Default(), 0},
		{"ORU-R01-01.hl7", "ORU-R01-01", mapping.Default(), 0},
		{"ORU-R01-RMGEAD.hl7", "ORU-R01-RMGEAD", mapping.Default(), 0},
		{"ORU-R01-RMGEAD.hl7", "ORU-R01-RMGEAD", localCodes{mapping.Default()}, 1},
	}
	// Every ORU^R01 of the data set is compared.
	covered := map[string]bool{}
	for _, c := range cases {
		covered[c.file] = true
	}
	for name, b := range msgs {
		if m, err := Parse(b); err == nil {
			if h := ReadHeader(m); h.Type == "ORU" && h.Trigger == "R01" && !covered[name] {
				t.Errorf("%s is an ORU^R01 without a case here", name)
			}
		}
	}
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			m, err := Parse(msgs[c.file])
			if err != nil {
				t.Fatal(err)
			}
			res := testDecoder(c.codes).DecodeORU(m, Env{Tenant: "t1", NowMs: time.Now().UnixMilli()})
			issues := map[int]Issue{}
			for _, is := range res.Issues {
				if is.Segment == "OBX" {
					issues[is.Sequence] = is
				}
			}
			// OBX occurrences by code, in order.
			byCode := map[string][]Segment{}
			for i := 0; i < m.Len(); i++ {
				if s := m.Segment(i); s.Is("OBX") {
					code := s.Field(3).Component(1).String()
					byCode[code] = append(byCode[code], s)
				}
			}
			read := map[int]Observation{}
			for _, o := range testDecoder(c.codes).ReadObservations(m) {
				read[o.Sequence] = o
			}
			used := map[string]int{}
			mapped, numeric, compared := 0, 0, 0
			for _, o := range expectedObservations(t, c.expected) {
				code := o.Code.Coding[0].Code
				k := used[code]
				used[code]++
				if k >= len(byCode[code]) {
					t.Fatalf("expected Observation %s #%d has no OBX", code, k+1)
				}
				obx := byCode[code][k]
				n := obx.Occurrence()
				if o.ValueQuantity == nil {
					// Not numeric in FHIR either: Vigil must not have
					// made a sample of it.
					if _, refused := issues[n]; !refused && obx.Field(2).Component(1).String() != "" {
						t.Errorf("OBX[%d] %s: non-numeric Observation, but no refusal", n, code)
					}
					if is, ok := issues[n]; ok && obx.Field(2).String() == "NM" && is.Reason != validate.AbsentValue {
						t.Errorf("OBX[%d] %s: NM without a value refused with %s, want absent_value", n, code, is.Reason)
					}
					continue
				}
				numeric++
				// What Vigil reads from the OBX, mapped or not, is what
				// the FHIR Observation says.
				obs := read[n]
				unit := o.ValueQuantity.Code
				if unit == "" {
					unit = o.ValueQuantity.Unit
				}
				var wantMs int64
				if o.EffectiveDateTime != "" {
					w, err := time.Parse(time.RFC3339, o.EffectiveDateTime)
					if err != nil {
						t.Fatal(err)
					}
					wantMs = w.UnixMilli()
				} else {
					// No OBX-14: the FHIR converter leaves the
					// effective time out, Vigil takes OBR-7.
					obr, _ := m.First("OBR")
					wantMs, err = ParseTime(obr.Field(7).Raw(), nil)
					if err != nil {
						t.Fatal(err)
					}
				}
				if obs.Code != code || !obs.Numeric || math.Abs(obs.Value-o.ValueQuantity.Value) > 1e-9 ||
					!strings.EqualFold(obs.Unit, unit) || !obs.TimeOK || obs.TimeMs != wantMs {
					t.Errorf("OBX[%d] read as %+v, want code %s value %v unit %q time %s", n, obs, code, o.ValueQuantity.Value,
						unit, time.UnixMilli(wantMs).UTC())
				}
				compared++
				is, refused := issues[n]
				metric, maps := "", false
				sys := codeSystem(obx.Field(3).Component(3).String())
				if sys != "" {
					metric, maps = c.codes.Metric(sys, code)
				}
				if !maps {
					want := validate.UnmappedCode
					if sys == mapping.SystemLOINC {
						want = validate.NotVitalSign
					}
					if !refused || is.Reason != want || is.Field != 3 {
						t.Errorf("OBX[%d] %s (%s): refusal %+v, want %s on OBX-3", n, code, sys, is, want)
					}
					continue
				}
				if refused {
					t.Errorf("OBX[%d] %s maps onto %s but was refused: %+v", n, code, metric, is)
					continue
				}
				mapped++
				var got *vigilv1.Sample
				for _, b := range res.Batches {
					for _, s := range b.Samples {
						if strings.HasSuffix(s.SourceCode, ":"+code) && s.Metric == metric {
							got = s
						}
					}
				}
				if got == nil {
					t.Fatalf("OBX[%d] %s: no sample", n, code)
				}
				if math.Abs(got.Value-o.ValueQuantity.Value) > 1e-9 {
					t.Errorf("OBX[%d] %s: value %v, want %v", n, code, got.Value, o.ValueQuantity.Value)
				}
				if !strings.EqualFold(got.Unit, unit) {
					t.Errorf("OBX[%d] %s: unit %q, want %q", n, code, got.Unit, unit)
				}
				if got.EventTimeMs != wantMs {
					t.Errorf("OBX[%d] %s: time %s, want %s", n, code, time.UnixMilli(got.EventTimeMs).UTC(), time.UnixMilli(wantMs).UTC())
				}
			}
			if (numeric == 0 || compared != numeric) && c.expected != "ORU-R01-01" {
				t.Errorf("%d of %d numeric Observations compared", compared, numeric)
			}
			t.Logf("%s: %d numeric Observations agree on code, value, unit and time; %d mapped onto Vigil metrics", c.file, compared, mapped)
			if mapped != c.wantMapped {
				t.Errorf("%d Observations mapped onto Vigil metrics, want %d", mapped, c.wantMapped)
			}
		})
	}
}

// TestDatasetORURefusalReasons pins the reasons of the refused OBX of the
// data set's ORU messages: OBX-11 pending → absent_value, coded and text
// values → unsupported_value, numeric lab values → not_vital_sign.
func TestDatasetORURefusalReasons(t *testing.T) {
	msgs := datasetMessages(t)
	m, err := Parse(msgs["ORU-R01-01.hl7"])
	if err != nil {
		t.Fatal(err)
	}
	res := testDecoder(mapping.Default()).DecodeORU(m, Env{Tenant: "t1", NowMs: time.Now().UnixMilli()})
	got := map[string]validate.Reason{}
	for _, is := range res.Issues {
		got[is.Path()] = is.Reason
	}
	want := map[string]validate.Reason{
		"OBX[1]-2":  validate.UnsupportedValue, // RP
		"OBX[2]-2":  validate.UnsupportedValue, // ED
		"OBX[3]-2":  validate.UnsupportedValue, // CWE
		"OBX[4]-11": validate.AbsentValue,      // RP with status O (order detail only)
		"OBX[5]-11": validate.AbsentValue,      // 8867-4 NM with status I (pending)
	}
	for p, r := range want {
		if got[p] != r {
			t.Errorf("%s: %q, want %q (all: %v)", p, got[p], r, got)
		}
	}
	if res.Samples != 0 || len(res.Letters) != len(res.Issues) {
		t.Errorf("samples %d, letters %d, issues %d", res.Samples, len(res.Letters), len(res.Issues))
	}
	for _, l := range res.Letters {
		if l.Field == "" || len(l.Raw) == 0 || !strings.HasPrefix(string(l.Raw), "OBX|") || l.MessageId == "" {
			t.Errorf("dead letter %v", l)
		}
	}
}
