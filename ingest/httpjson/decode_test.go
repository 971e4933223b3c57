package httpjson

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/go-json-experiment/json/jsontext"

	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/testenv"
)

func decodeString(t *testing.T, s string, max int) (*body, *bodyError) {
	t.Helper()
	var d decoder
	return d.decode([]byte(s), max)
}

func TestDecodeFields(t *testing.T) {
	b, e := decodeString(t, `{"tenant":"st-mary","patient":"p-1","device":"bed-7","message_id":"m1","samples":[
		{"metric":"heart_rate","value":72,"unit":"/min","time":"2026-11-23T10:00:00.250Z","seq":17},
		{"loinc":"59408-5","value":0.97,"unit":"1","time_ms":1795428000250,"channel":"c\u0031","patient":"p-2"},
		{"metric":"spo2","value":null,"unit":null,"time_ms":1}
	]}`, 10)
	if e != nil {
		t.Fatal(e)
	}
	if string(b.tenant.b) != "st-mary" || string(b.patient.b) != "p-1" || string(b.device.b) != "bed-7" || string(b.messageID.b) != "m1" {
		t.Errorf("top level: %+v", b)
	}
	if len(b.samples) != 3 {
		t.Fatalf("%d samples", len(b.samples))
	}
	s0, s1, s2 := b.samples[0], b.samples[1], b.samples[2]
	if string(s0.metric.b) != "heart_rate" || s0.value != 72 || !s0.hasValue || string(s0.unit.b) != "/min" ||
		s0.timeMs != 1795428000250 || s0.timeField != "time" || s0.seq != 17 || s0.refusal != nil {
		t.Errorf("sample 0: %+v", s0)
	}
	if string(s1.loinc.b) != "59408-5" || s1.value != 0.97 || s1.timeMs != 1795428000250 || s1.timeField != "time_ms" ||
		string(s1.channel.b) != "c1" || string(s1.patient.b) != "p-2" || s1.tenant.ok {
		t.Errorf("sample 1: %+v", s1)
	}
	if s2.hasValue || s2.unit.ok || !s2.hasTime {
		t.Errorf("sample 2 nulls: %+v", s2)
	}
	if !strings.HasPrefix(string(s0.raw), `{"metric":"heart_rate"`) || !strings.HasSuffix(string(s0.raw), `"seq":17}`) {
		t.Errorf("raw of sample 0: %q", s0.raw)
	}
	if !strings.HasPrefix(string(s1.raw), `{"loinc"`) || !strings.HasSuffix(string(s1.raw), `"patient":"p-2"}`) {
		t.Errorf("raw of sample 1: %q", s1.raw)
	}
}

func TestDecodeSampleRefusals(t *testing.T) {
	cases := []struct {
		sample string
		reason validate.Reason
		field  string
	}{
		{`{"metric":"heart_rate","vale":72,"time_ms":1}`, validate.UnknownField, "samples[1].vale"},
		{`{"metric":"heart_rate","value":"72","time_ms":1}`, validate.InvalidType, "samples[1].value"},
		{`{"metric":7,"value":72,"time_ms":1}`, validate.InvalidType, "samples[1].metric"},
		{`{"metric":"heart_rate","value":1e400,"time_ms":1}`, validate.NotFinite, "samples[1].value"},
		{`{"metric":"heart_rate","value":72,"time":"yesterday"}`, validate.InvalidTime, "samples[1].time"},
		{`{"metric":"heart_rate","value":72,"time":"2026-02-30T10:00:00Z"}`, validate.InvalidTime, "samples[1].time"},
		{`{"metric":"heart_rate","value":72,"time_ms":1.5}`, validate.InvalidType, "samples[1].time_ms"},
		{`{"metric":"heart_rate","value":72,"time_ms":1,"time":"2026-11-23T10:00:00Z"}`, validate.InvalidTime, "samples[1].time"},
		{`{"metric":"heart_rate","value":72,"time_ms":1,"seq":-1}`, validate.InvalidType, "samples[1].seq"},
		{`{"metric":"heart_rate","value":72,"time_ms":1,"seq":18446744073709551616}`, validate.InvalidType, "samples[1].seq"},
		{`[1,2]`, validate.InvalidType, "samples[1]"},
		{`"x"`, validate.InvalidType, "samples[1]"},
	}
	for _, c := range cases {
		t.Run(c.sample, func(t *testing.T) {
			b, e := decodeString(t, `{"samples":[{"metric":"spo2","value":97,"time_ms":1},`+c.sample+`,{"metric":"spo2","value":96,"time_ms":2}]}`, 10)
			if e != nil {
				t.Fatalf("whole body refused: %v", e)
			}
			if len(b.samples) != 3 || b.samples[0].refusal != nil || b.samples[2].refusal != nil {
				t.Fatalf("neighbours affected: %+v", b.samples)
			}
			r := b.samples[1].refusal
			if r == nil || r.Reason != c.reason || r.Field != c.field {
				t.Fatalf("refusal %v, want %s at %s", r, c.reason, c.field)
			}
			if string(b.samples[1].raw) != c.sample {
				t.Errorf("raw %q, want %q", b.samples[1].raw, c.sample)
			}
		})
	}
}

func TestDecodeBodyErrors(t *testing.T) {
	cases := []struct {
		body         string
		status       int
		reason       validate.Reason
		field        string
		line, column int
	}{
		{"", 400, validate.InvalidJSON, "", 1, 1},
		{`[]`, 400, validate.InvalidJSON, "", 1, 1},
		{"{\"samples\":[\n  {\"metric\":\"spo2\",\n   \"value\":97,,\n}]}", 400, validate.InvalidJSON, "samples[0]", 3, 15},
		{`{"samples":[{"metric":"spo2"}`, 400, validate.InvalidJSON, "", 1, 30},
		{`{"samples":[{"metric":"spo2","value":1,"time_ms":1}]} x`, 400, validate.InvalidJSON, "", 1, 55},
		{`{"samples":[{"metric":"spo2","metric":"hr"}]}`, 400, validate.InvalidJSON, "samples[0]", 1, 30},
		{`{"tenant":"a","tenannt":"b","samples":[]}`, 400, validate.UnknownField, "tenannt", 1, 15},
		{`{"tenant":5,"samples":[]}`, 400, validate.InvalidType, "tenant", 1, 11},
		{`{"samples":{}}`, 400, validate.InvalidType, "samples", 1, 12},
		{`{"samples":[]}`, 400, validate.MissingField, "samples", 0, 0},
		{`{"tenant":"a"}`, 400, validate.MissingField, "samples", 0, 0},
		{`{"samples":[{},{},{}]}`, 413, validate.TooManySamples, "samples", 1, 19},
		{"{\"samples\":[{\"metric\":\"\xff\"}]}", 400, validate.InvalidJSON, "samples[0]", 1, 24},
	}
	for _, c := range cases {
		t.Run(c.body, func(t *testing.T) {
			_, e := decodeString(t, c.body, 2)
			if e == nil {
				t.Fatal("accepted")
			}
			if e.status != c.status || e.reason != c.reason || e.field != c.field || e.line != c.line || e.column != c.column {
				t.Errorf("got %d %s %q line %d col %d (%s); want %d %s %q line %d col %d",
					e.status, e.reason, e.field, e.line, e.column, e.message, c.status, c.reason, c.field, c.line, c.column)
			}
		})
	}
}

// TestRequestTypeRoundTrip checks that what the exported client types
// marshal is what the decoder reads.
func TestRequestTypeRoundTrip(t *testing.T) {
	req := Request{Tenant: "t", Patient: "p", Device: "d", MessageID: "m", Samples: []Sample{
		{Metric: "heart_rate", Value: 0, Unit: "/min", TimeMs: 5, Seq: 1},
		{Patient: "q", Device: "e", MessageID: "n", LOINC: "8310-5", Value: 37.5, Time: "2026-11-23T10:00:00Z", Channel: "c"},
	}}
	data, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	var d decoder
	b, e := d.decode(data, 10)
	if e != nil {
		t.Fatal(e)
	}
	if !b.samples[0].hasValue || b.samples[0].value != 0 || b.samples[0].seq != 1 || string(b.samples[1].messageID.b) != "n" ||
		string(b.samples[1].channel.b) != "c" || b.samples[1].timeMs != time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC).UnixMilli() {
		t.Errorf("round trip: %+v", b.samples)
	}
}

func TestDecodeAllocations(t *testing.T) {
	var sb strings.Builder
	sb.WriteString(`{"tenant":"st-mary","patient":"p-1","device":"bed-7","samples":[`)
	for i := range 1000 {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, `{"metric":"heart_rate","value":%d.5,"unit":"/min","time":"2026-11-23T10:00:%02d.250Z","seq":%d}`, 60+i%40, i%60, i)
	}
	sb.WriteString(`]}`)
	data := []byte(sb.String())
	var d decoder
	if _, e := d.decode(data, 10000); e != nil { // warm up: grows the sample slice
		t.Fatal(e)
	}
	allocs := testing.AllocsPerRun(10, func() {
		if _, e := d.decode(data, 10000); e != nil {
			t.Fatal(e)
		}
	})
	if allocs > 20 {
		t.Errorf("decoding 1000 samples allocates %v times; want a constant few", allocs)
	}
}

func TestParseRFC3339(t *testing.T) {
	for _, s := range []string{"2026-11-23T10:00:00Z", "2026-11-23T10:00:00.250Z", "2026-11-23T10:00:00.123456789+02:00",
		"2024-02-29T23:59:59-11:30", "1970-01-01T00:00:00.001Z", "2026-11-23t10:00:00z", "1969-12-31T23:59:59.5Z"} {
		got, ok := parseRFC3339Ms([]byte(s))
		want, err := time.Parse(time.RFC3339Nano, strings.ToUpper(s))
		if !ok || err != nil || got != want.UnixMilli() {
			t.Errorf("%s: got %d %v, want %d (%v)", s, got, ok, want.UnixMilli(), err)
		}
	}
	for _, s := range []string{"2026-11-23", "2026-11-23T10:00:00", "2026-13-01T00:00:00Z", "2025-02-29T00:00:00Z",
		"2026-11-23T24:00:00Z", "2026-11-23T10:00:60Z", "2026-11-23T10:00:00.Z", "2026-11-23T10:00:00+0200",
		"2026-11-23 10:00:00Z", "2026-11-23T10:00:00.1234567890Z", "+026-11-23T10:00:00Z"} {
		if _, ok := parseRFC3339Ms([]byte(s)); ok {
			t.Errorf("%s accepted", s)
		}
	}
}

func FuzzParseRFC3339(f *testing.F) {
	for _, s := range []string{"2026-11-23T10:00:00Z", "2026-11-23T10:00:00.250+01:00", "2024-02-29T00:00:00-00:00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, ok := parseRFC3339Ms([]byte(s))
		if !ok {
			return
		}
		want, err := time.Parse(time.RFC3339Nano, strings.ToUpper(s))
		if err != nil {
			t.Fatalf("%q accepted, time.Parse refuses: %v", s, err)
		}
		if want.UnixMilli() != got {
			t.Fatalf("%q: got %d, want %d", s, got, want.UnixMilli())
		}
	})
}

// datasetBodies turns the first rows of the first patient of the PhysioNet
// sepsis set (sepsis2019-setB) into request bodies of up to n hourly rows:
// real values, with the columns the catalogue knows as metrics, NaN cells
// left out.
func datasetBodies(tb testing.TB, n int) [][]byte {
	tb.Helper()
	f, err := os.Open(filepath.Join(testenv.Dataset(tb, "sepsis2019-setB"), "training_setB.tar.gz"))
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		tb.Fatal(err)
	}
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if err != nil {
			tb.Fatalf("no .psv file in the sepsis set: %v", err)
		}
		if strings.HasSuffix(h.Name, ".psv") {
			break
		}
	}
	sc := bufio.NewScanner(tr)
	sc.Scan()
	header := strings.Split(sc.Text(), "|")
	metrics := map[string][2]string{"HR": {"heart_rate", "/min"}, "O2Sat": {"spo2", "%"}, "Temp": {"body_temperature", "Cel"},
		"SBP": {"systolic_bp", "mm[Hg]"}, "MAP": {"mean_arterial_pressure", "mm[Hg]"}, "DBP": {"diastolic_bp", "mm[Hg]"},
		"Resp": {"respiratory_rate", "/min"}, "FiO2": {"fio2", "1"}, "Glucose": {"glucose", "mg/dL"}}
	t0 := time.Date(2026, 11, 23, 0, 0, 0, 0, time.UTC)
	var out [][]byte
	req := Request{Tenant: "sepsis-b", Patient: "p-1", Device: "psv", MessageID: "psv-1"}
	for row := 0; sc.Scan() && row < n; row++ {
		for i, cell := range strings.Split(sc.Text(), "|") {
			m, ok := metrics[header[min(i, len(header)-1)]]
			v, err := strconv.ParseFloat(cell, 64)
			if !ok || err != nil || math.IsNaN(v) {
				continue
			}
			req.Samples = append(req.Samples, Sample{Metric: m[0], Value: v, Unit: m[1],
				Time: t0.Add(time.Duration(row) * time.Hour).Format(time.RFC3339Nano), Seq: uint64(len(req.Samples) + 1)})
		}
		body, err := json.Marshal(req)
		if err != nil {
			tb.Fatal(err)
		}
		out = append(out, body)
	}
	if len(out) == 0 {
		tb.Fatal("no rows read from the sepsis set")
	}
	return out
}

// FuzzDecode checks that no input panics the decoder, that what it accepts
// is consistent (raw spans inside the body and valid JSON, sample count
// within the bound), and that its allocation stays proportional to the
// input.
func FuzzDecode(f *testing.F) {
	seeds := []string{
		`{"tenant":"t","patient":"p","device":"d","samples":[{"metric":"heart_rate","value":72,"unit":"/min","time_ms":1795428000250,"seq":1}]}`,
		`{"samples":[{"loinc":"8310-5","value":101.3,"unit":"[degF]","time":"2026-11-23T10:00:00.250Z","tenant":"t","patient":"p","device":"d"}]}`,
		`{"samples":[{"metric":"spo2","value":0.97,"unit":"1","time_ms":1,"channel":"a\u0000b"},[],"x",null,{"vale":1}]}`,
		`{"samples":[{"metric":"heart_rate","value":1e400,"time":"2026-02-30T00:00:00Z","seq":-1}]}`,
		`{"samples":[{"metric":"heart_rate","value":72,"time_ms":1,"time":"2026-11-23T10:00:00Z","x":{"y":[1,{"z":null}]}}]}`,
		`{"samples":[{}],"message_id":"m"} `,
		`{"samples":[{"metric":"spo2","metric":"x"}]}`,
		`{"samples":[{"metric":"spo2"}`,
		`[{"samples":[]}]`,
		"{\"samples\":[{\"metric\":\"\xff\"}]}",
		`{"samples":[` + strings.Repeat(`{},`, 20) + `{}]}`,
		`{"tenant":` + strings.Repeat(`[`, 100) + strings.Repeat(`]`, 100) + `}`,
		``, `null`, `{}`, `{"samples":null}`,
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	for _, body := range datasetBodies(f, 6) {
		f.Add(body)
	}
	const maxSamples = 16
	var d decoder
	f.Fuzz(func(t *testing.T, data []byte) {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		b, e := d.decode(data, maxSamples)
		runtime.ReadMemStats(&after)
		// Generous: the sample slice (bounded by maxSamples) plus a
		// constant plus a small multiple of the input.
		limit := uint64(64<<10) + uint64(maxSamples+1)*2*uint64(unsafe.Sizeof(sampleIn{})) + 16*uint64(len(data))
		if got := after.TotalAlloc - before.TotalAlloc; got > limit {
			t.Errorf("decoding %d bytes allocated %d bytes (limit %d)", len(data), got, limit)
		}
		if e != nil {
			if e.reason == "" || e.message == "" || (e.status != 400 && e.status != 413) {
				t.Errorf("incomplete body error %+v", e)
			}
			if e.offset > int64(len(data)) {
				t.Errorf("error offset %d beyond %d bytes", e.offset, len(data))
			}
			return
		}
		if len(b.samples) == 0 || len(b.samples) > maxSamples {
			t.Fatalf("%d samples accepted (bound %d)", len(b.samples), maxSamples)
		}
		for i, s := range b.samples {
			if !jsontext.Value(s.raw).IsValid() {
				t.Errorf("sample %d raw %q is not valid JSON", i, s.raw)
			}
			if !bytes.Contains(data, s.raw) {
				t.Errorf("sample %d raw %q is not part of the body", i, s.raw)
			}
			if s.refusal != nil && (s.refusal.Reason == "" || !strings.HasPrefix(s.refusal.Field, fmt.Sprintf("samples[%d]", i))) {
				t.Errorf("sample %d refusal %+v", i, s.refusal)
			}
		}
	})
}
