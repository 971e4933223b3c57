package hl7

import (
	"strings"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/ingest/binding"
	"github.com/vigilhealth/vigil/ingest/mapping"
	"github.com/vigilhealth/vigil/ingest/validate"
)

func TestDecodePCD01(t *testing.T) {
	m, err := Parse([]byte(pcdSample))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2024, 3, 1, 10, 15, 1, 0, time.UTC).UnixMilli()
	res := testDecoder(mapping.Default()).DecodeORU(m, Env{Tenant: "h1", NowMs: now})
	if len(res.Issues) != 0 {
		t.Fatalf("issues: %+v", res.Issues)
	}
	if len(res.Batches) != 1 || res.Samples != 7 {
		t.Fatalf("%d batches, %d samples", len(res.Batches), res.Samples)
	}
	b := res.Batches[0]
	if b.Patient != "MRN-42" || b.Device != "AABBCCDDEEFF0011" || b.Location != "bed:ICU/12/A" || b.MessageId != "PCD-0001" || b.Tenant != "h1" {
		t.Errorf("batch header %v", b)
	}
	want := map[string]struct {
		v    float64
		unit string
		at   string
		code string
	}{
		"heart_rate":             {72, "/min", "2024-03-01T10:14:55Z", "MDC:147842"},
		"spo2":                   {97, "%", "2024-03-01T10:14:55Z", "MDC:150456"},
		"respiratory_rate":       {16, "/min", "2024-03-01T10:14:55Z", "MDC:151562"},
		"systolic_bp":            {121, "mm[Hg]", "2024-03-01T10:14:00Z", "MDC:150021"},
		"diastolic_bp":           {79, "mm[Hg]", "2024-03-01T10:14:00Z", "MDC:150022"},
		"mean_arterial_pressure": {93, "mm[Hg]", "2024-03-01T10:14:00Z", "MDC:150023"},
		"body_temperature":       {37.2, "Cel", "2024-03-01T10:10:00Z", "MDC:150364"},
	}
	for _, s := range b.Samples {
		w, ok := want[s.Metric]
		if !ok {
			t.Errorf("unexpected sample %v", s)
			continue
		}
		at, _ := time.Parse(time.RFC3339, w.at)
		if s.Value != w.v || s.Unit != w.unit || s.EventTimeMs != at.UnixMilli() || s.SourceCode != w.code || s.Channel == "" {
			t.Errorf("%s: %v, want %+v", s.Metric, s, w)
		}
		delete(want, s.Metric)
	}
	if len(want) != 0 {
		t.Errorf("missing %v", want)
	}
}

func TestDecodeRefusals(t *testing.T) {
	base := "MSH|^~\\&|GW|ICU|||20240301101500||ORU^R01|X1|P|2.5\rPID|||p1\r"
	now := time.Date(2024, 3, 1, 10, 15, 1, 0, time.UTC).UnixMilli()
	for name, c := range map[string]struct {
		obx    string
		reason validate.Reason
		path   string
	}{
		"sentinel":      {"OBX|1|NM|150456^^MDC||-999|262688^^MDC|||||F", validate.AbsentValue, "OBX[1]-5"},
		"deleted":       {"OBX|1|NM|150456^^MDC||97|262688^^MDC|||||D", validate.AbsentValue, "OBX[1]-11"},
		"string":        {"OBX|1|ST|150456^^MDC||high|||||F", validate.UnsupportedValue, "OBX[1]-2"},
		"unmapped code": {"OBX|1|NM|999999^MDC_NOPE^MDC||1|262688^^MDC|||||F", validate.UnmappedCode, "OBX[1]-3"},
		"unmapped unit": {"OBX|1|NM|150456^^MDC||97|999999^MDC_DIM_NOPE^MDC|||||F", validate.UnmappedCode, "OBX[1]-6"},
		"lab loinc":     {"OBX|1|NM|2345-7^Glucose^LN||97|mg/dL|||||F", validate.NotVitalSign, "OBX[1]-3"},
		"sn comparator": {"OBX|1|SN|150456^^MDC||<^90|262688^^MDC|||||F", validate.UnsupportedValue, "OBX[1]-5"},
		"not a number":  {"OBX|1|NM|150456^^MDC||9x7|262688^^MDC|||||F", validate.InvalidType, "OBX[1]-5"},
		"out of range":  {"OBX|1|NM|150456^^MDC||140|262688^^MDC|||||F", validate.OutOfRange, "OBX[1]-5"},
		"bad time":      {"OBX|1|NM|150456^^MDC||97|262688^^MDC|||||F|||2024133", validate.InvalidTime, "OBX[1]-14"},
		"future":        {"OBX|1|NM|150456^^MDC||97|262688^^MDC|||||F|||20250101", validate.FutureTime, "OBX[1]-14"},
		"waveform":      {"OBX|1|NA|131329^MDC_ECG_ELEC_POTL_I^MDC||1^2^3|||||F", validate.UnsupportedValue, "OBX[1]-2"},
	} {
		m, err := Parse([]byte(base + c.obx + "\r"))
		if err != nil {
			t.Fatal(err)
		}
		res := testDecoder(mapping.Default()).DecodeORU(m, Env{Tenant: "h1", NowMs: now})
		if len(res.Issues) != 1 || res.Issues[0].Reason != c.reason || res.Issues[0].Path() != c.path {
			t.Errorf("%s: issues %+v, want %s at %s", name, res.Issues, c.reason, c.path)
			continue
		}
		if len(res.Letters) != 1 || res.Letters[0].Reason != string(c.reason) || res.Letters[0].Field != c.path {
			t.Errorf("%s: letters %v", name, res.Letters)
		}
		if c.reason == validate.UnmappedCode && !strings.Contains(res.Letters[0].Message, "999999") {
			t.Errorf("%s: the dead letter must name the code: %q", name, res.Letters[0].Message)
		}
	}
}

type fakeResolver map[string]string

func (f fakeResolver) Resolve(tenant, key string, _ int64) (string, bool) {
	p, ok := f[tenant+"|"+key]
	return p, ok
}

func TestDecodeResolvesPatient(t *testing.T) {
	msg := "MSH|^~\\&|GW|ICU|||20240301101500||ORU^R01|X1|P|2.5\rPV1||I|ICU^^7\r" +
		"OBX|1|NM|150456^^MDC||97|262688^^MDC|||||F|||||||dev-1\r" +
		"OBX|2|NM|147842^^MDC||70|264864^^MDC|||||F|||||||dev-2\r"
	m, err := Parse([]byte(msg))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2024, 3, 1, 10, 15, 1, 0, time.UTC).UnixMilli()
	res := testDecoder(mapping.Default()).DecodeORU(m, Env{Tenant: "h1", NowMs: now, Resolver: fakeResolver{"h1|dev-1": "p-dev"}})
	if len(res.Batches) != 1 || res.Batches[0].Patient != "p-dev" || res.Batches[0].Device != "dev-1" {
		t.Errorf("batches %v", res.Batches)
	}
	if len(res.Letters) != 1 || res.Letters[0].Reason != string(validate.UnboundDevice) || res.Letters[0].Batch == nil ||
		res.Letters[0].Batch.Location != "bed:ICU/7" || res.Letters[0].Batch.Patient != "" || len(res.Letters[0].Batch.Samples) != 1 {
		t.Errorf("letters %v", res.Letters)
	}
	res = testDecoder(mapping.Default()).DecodeORU(m, Env{Tenant: "h1", NowMs: now, Resolver: fakeResolver{"h1|bed:ICU/7": "p-bed"}})
	if len(res.Batches) != 2 || res.Batches[0].Patient != "p-bed" || len(res.Letters) != 0 {
		t.Errorf("by bed: batches %v letters %v", res.Batches, res.Letters)
	}
}

func TestDecodeADT(t *testing.T) {
	msg := func(trig string) *Message {
		m, err := Parse([]byte("MSH|^~\\&|ADT|H|||20240301100000||ADT^" + trig + "|A1|P|2.5\rEVN|" + trig + "|20240301095900\rPID|||p1^^^H^MR\rPV1||I|ICU^^7|||ICU^^3\r"))
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	at := time.Date(2024, 3, 1, 9, 59, 0, 0, time.UTC).UnixMilli()
	ev, iss := DecodeADT(msg("A02"), "A02", nil, 0)
	if iss != nil || ev == nil || ev.Kind != binding.ADTTransfer || ev.Bed != "bed:ICU/7" || ev.PriorBed != "bed:ICU/3" ||
		ev.Patient != "p1" || ev.AtMs != at {
		t.Errorf("A02: %+v %v", ev, iss)
	}
	if ev, _ = DecodeADT(msg("A01"), "A01", nil, 0); ev == nil || ev.Kind != binding.ADTAdmit || ev.Bed != "bed:ICU/7" {
		t.Errorf("A01: %+v", ev)
	}
	if ev, _ = DecodeADT(msg("A03"), "A03", nil, 0); ev == nil || ev.Kind != binding.ADTDischarge || ev.Patient != "p1" {
		t.Errorf("A03: %+v", ev)
	}
	if ev, _ = DecodeADT(msg("A08"), "A08", nil, 0); ev == nil || ev.Kind != binding.ADTUpdate {
		t.Errorf("A08: %+v", ev)
	}
	if ev, iss = DecodeADT(msg("A31"), "A31", nil, 0); ev != nil || iss != nil {
		t.Errorf("A31 (no binding change): %+v %v", ev, iss)
	}
	noPID, err := Parse([]byte("MSH|^~\\&|ADT|H|||20240301100000||ADT^A01|A1|P|2.5\rPV1||I|ICU^^7\r"))
	if err != nil {
		t.Fatal(err)
	}
	if ev, iss = DecodeADT(noPID, "A01", nil, 0); ev != nil || iss == nil || iss.Path() != "PID-3" {
		t.Errorf("A01 without PID-3: %+v %+v", ev, iss)
	}
}

func TestBuildACK(t *testing.T) {
	m, _ := Parse([]byte(pcdSample))
	h := ReadHeader(m)
	ack := BuildACK(nil, h, AR, []Issue{{Segment: "OBX", Sequence: 3, Field: 5, Code: CodeDataType, Severity: SeverityError,
		Reason: validate.InvalidType, Message: "value \"a|b\" is not a number"}}, time.Date(2024, 3, 1, 0, 0, 0, 0, time.UTC), "ACK1")
	a, err := Parse(ack)
	if err != nil {
		t.Fatal(err)
	}
	ah := ReadHeader(a)
	if ah.Type != "ACK" || ah.Trigger != "R01" || ah.SendingFacility != "HOSP" || ah.ReceivingFacility != "ICU-EAST" || ah.Version != "2.6" {
		t.Errorf("ack header %+v", ah)
	}
	msa, _ := a.First("MSA")
	if msa.Field(1).String() != "AR" || msa.Field(2).String() != "PCD-0001" {
		t.Errorf("MSA %q", msa.Raw())
	}
	er, _ := a.First("ERR")
	if er.Field(2).Component(1).String() != "OBX" || er.Field(2).Component(2).String() != "3" || er.Field(2).Component(3).String() != "5" ||
		er.Field(3).Component(1).String() != "102" || er.Field(4).String() != "E" || er.Field(5).Component(1).String() != "invalid_type" ||
		er.Field(8).String() != "OBX[3]-5: value \"a|b\" is not a number" {
		t.Errorf("ERR %q", er.Raw())
	}
}
