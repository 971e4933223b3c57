package waveform

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func TestMain(m *testing.M) { testenv.Main(m) }

type env struct {
	url, broker           string
	samplesTopic, dlTopic string
}

func startHTTP(t *testing.T) *env {
	t.Helper()
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, "")
	deps := stage.Deps{Log: testenv.Logger(t), Metrics: prometheus.NewRegistry()}
	pub, err := publish.New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	proc, err := NewProcessor(pub, Options{MaxChannels: cfg.Waveform.MaxChannels, MaxChunkSamples: cfg.Waveform.MaxChunkSamples}, deps)
	if err != nil {
		t.Fatal(err)
	}
	h, err := NewHandler(proc, pub, cfg.HTTP.MaxBodyBytes, cfg.Ingest.DeadLetterRawLimit, deps)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("POST "+Path, h)
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		srv.Close()
		_ = pub.Close(context.Background())
	})
	return &env{url: srv.URL + Path, broker: broker, samplesTopic: cfg.Kafka.Topics.Samples, dlTopic: cfg.Kafka.Topics.DeadLetter}
}

func postJSON(t *testing.T, url string, body []byte) (int, []byte) {
	t.Helper()
	resp, err := http.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

// TestRecord100OverHTTP posts MIT-BIH record 100 (lead MLII) to a real HTTP
// server in 10-second chunks, backed by a Publisher on a real broker, and
// checks the rr_interval samples on vigil.samples.v1 against the RR
// intervals of the reference annotations.
func TestRecord100OverHTTP(t *testing.T) {
	r := load100(t)
	e := startHTTP(t)
	x := r.mlii
	if testing.Short() {
		x = x[:360*300]
	}
	start := time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC)
	totalRR, chunks := 0, 0
	for off := 0; off < len(x); off += 3600 {
		end := min(off+3600, len(x))
		req := Request{Tenant: "st-mary", Patient: "p-100", Device: "holter-1", Channel: "MLII", Metric: "ecg", Unit: "mV",
			RateHz: 360, Values: x[off:end]}
		if chunks%2 == 0 {
			req.StartMs = start.UnixMilli() + int64(off)*1000/360
		} else {
			// RFC 3339 with milliseconds: 10 s chunks start on whole ms.
			req.Start = start.Add(time.Duration(off) * time.Second / 360).Format(time.RFC3339Nano)
		}
		body, _ := json.Marshal(req)
		code, out := postJSON(t, e.url, body)
		if code != http.StatusOK {
			t.Fatalf("chunk %d: %d %s", chunks, code, out)
		}
		var res Response
		if err := json.Unmarshal(out, &res); err != nil || res.AcceptedSamples != end-off {
			t.Fatalf("chunk %d: answer %s (%v)", chunks, out, err)
		}
		totalRR += res.RRIntervals
		chunks++
	}
	// Every answered RR interval is already in Kafka: read them back.
	var got []*vigilv1.Sample
	for _, rec := range testenv.ReadAll(t, e.broker, e.samplesTopic) {
		if string(rec.Key) != "st-mary/p-100" {
			t.Fatalf("record key %q", rec.Key)
		}
		var b vigilv1.SampleBatch
		if err := proto.Unmarshal(rec.Value, &b); err != nil {
			t.Fatal(err)
		}
		if b.Device != "holter-1" || b.Source != vigilv1.Source_SOURCE_HTTP {
			t.Fatalf("batch header %v", &b)
		}
		got = append(got, b.Samples...)
	}
	if len(got) != totalRR {
		t.Fatalf("%d rr samples in Kafka, answers promised %d", len(got), totalRR)
	}
	slices.SortFunc(got, func(a, b *vigilv1.Sample) int { return int(a.EventTimeMs - b.EventTimeMs) })

	// Reference RR intervals: consecutive annotated beats inside x.
	var beats []int64
	for _, b := range r.beats {
		if b < int64(len(x)) {
			beats = append(beats, b)
		}
	}
	wantN := len(beats) - 1
	t.Logf("%d chunks; %d rr_interval samples in Kafka; %d reference intervals", chunks, len(got), wantN)
	// The detector confirms a beat up to ~0.45 s late, so the record's last
	// beat is still pending: allow 0.5% (a missed beat costs 2 intervals).
	if d := math.Abs(float64(len(got) - wantN)); d > 0.005*float64(wantN)+1 {
		t.Errorf("%d rr samples, %d reference intervals", len(got), wantN)
	}
	// Each sample: its event time is the second beat; the matching
	// reference interval ends at the annotated beat nearest to it.
	tol := 150.0 // ms, the match window
	matched := 0
	for k, s := range got {
		if s.Metric != "rr_interval" || s.Unit != "ms" || s.Quality != uint32(vigilv1.QualityFlag_QUALITY_DERIVED) ||
			s.SourceCode != "derived:ecg" || s.Channel != "MLII" {
			t.Fatalf("sample %d: %v", k, s)
		}
		idx := float64(s.EventTimeMs-start.UnixMilli()) * 360 / 1000
		j, _ := slices.BinarySearch(beats, int64(idx))
		if j > 0 && (j == len(beats) || math.Abs(float64(beats[j-1])-idx) < math.Abs(float64(beats[j])-idx)) {
			j--
		}
		if j == 0 || math.Abs(float64(beats[j])-idx)*1000/360 > tol {
			continue
		}
		ref := float64(beats[j]-beats[j-1]) * 1000 / 360
		if math.Abs(s.Value-ref) <= 10 { // ~3.6 samples at 360 Hz
			matched++
		}
	}
	frac := float64(matched) / float64(len(got))
	t.Logf("%.2f%% of rr samples within 10 ms of the annotated interval", 100*frac)
	if frac < 0.99 {
		t.Errorf("only %.2f%% of rr samples match the annotations within 10 ms", 100*frac)
	}
}

func TestHTTPProblems(t *testing.T) {
	e := startHTTP(t)
	ok := `"tenant":"t","patient":"p","device":"d","rate_hz":360,"start_ms":1790000000000`
	cases := []struct {
		body   string
		status int
		reason string
		field  string
	}{
		{`{` + ok + `}`, 400, "missing_field", "values"},
		{`{` + ok + `,"values":[1,null,2]}`, 400, "invalid_type", "values[1]"},
		{`{` + ok + `,"values":[1,2],"colour":"red"}`, 400, "unknown_field", "colour"},
		{`{` + ok + `,"values":"1,2"}`, 400, "invalid_type", "values"},
		{`{"tenant":"t","patient":"p","device":"d","rate_hz":360,"values":[1]}`, 400, "missing_field", "start"},
		{`{"tenant":"t","patient":"p","device":"d","rate_hz":"360","start_ms":1,"values":[1]}`, 400, "invalid_type", "rate_hz"},
		{`{"tenant":"t","patient":"p","device":"d","rate_hz":20,"start_ms":1,"values":[1]}`, 400, "out_of_range", "rate_hz"},
		{`{"tenant":"t","patient":"p","device":"d","rate_hz":360,"start":"yesterday","values":[1]}`, 400, "invalid_time", "start"},
		{`{"tenant":"t","patient":"p","device":"d","rate_hz":360,"start_ms":1.5,"values":[1]}`, 400, "invalid_type", "start_ms"},
		{`{` + ok + `,"unit":"mm[Hg]","values":[1]}`, 400, "unit_not_convertible", "unit"},
		{`{` + ok + `,"values":[1,2`, 400, "invalid_json", "values[2]"},
		{`{` + ok + `,"values":[1e999]}`, 400, "not_finite", "values[0]"},
	}
	for _, c := range cases {
		code, out := postJSON(t, e.url, []byte(c.body))
		var p httpjson.Problem
		if err := json.Unmarshal(out, &p); err != nil {
			t.Fatalf("%s: answer %s", c.body, out)
		}
		if code != c.status || p.Reason != c.reason || p.Field != c.field || p.Status != code {
			t.Errorf("%s:\n got %d %s/%s (%s)\nwant %d %s/%s", c.body, code, p.Reason, p.Field, p.Detail, c.status, c.reason, c.field)
		}
	}
	// Each refusal is on the dead-letter topic.
	dls := testenv.Consume(t, e.broker, e.dlTopic, len(cases), 10*time.Second)
	if len(dls) != len(cases) {
		t.Errorf("%d dead letters, want %d", len(dls), len(cases))
	}
	var dl vigilv1.DeadLetter
	if err := proto.Unmarshal(dls[0].Value, &dl); err != nil || dl.Reason != "missing_field" || dl.Field != "values" {
		t.Errorf("first dead letter %v %v", &dl, err)
	}
	// Wrong method and media type.
	resp, err := http.Get(e.url)
	if err == nil {
		resp.Body.Close()
	}
	if err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("GET: %v %v", resp.StatusCode, err)
	}
	resp, err = http.Post(e.url, "text/plain", strings.NewReader("{}"))
	if err == nil {
		resp.Body.Close()
	}
	if err != nil || resp.StatusCode != http.StatusUnsupportedMediaType {
		t.Errorf("text/plain: %v %v", resp.StatusCode, err)
	}
}

func FuzzDecode(f *testing.F) {
	r := load100(f)
	body, _ := json.Marshal(Request{Tenant: "t", Patient: "p", Device: "d", Channel: "MLII", Metric: "ecg", Unit: "mV",
		RateHz: 360, StartMs: t0, Values: r.mlii[:200]})
	f.Add(body)
	f.Add([]byte(`{"tenant":"t","patient":"p","device":"d","rate_hz":360,"start":"2026-11-23T10:00:00.5Z","values":[1,-2.5e-3]}`))
	f.Add([]byte(`{"values":[null],"start_ms":1.5,"x":{}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := Decode(b, 1000)
		if err != nil {
			if err.Reason == "" {
				t.Fatalf("error without reason: %v", err)
			}
			return
		}
		if len(req.Values) > 1000 {
			t.Fatalf("%d values beyond the bound", len(req.Values))
		}
		for _, v := range req.Values {
			if math.IsNaN(v) || math.IsInf(v, 0) {
				t.Fatalf("non-finite value %v", v)
			}
		}
		if req.Tenant == "" && !bytes.Contains(b, []byte("tenant")) {
			t.Fatal("tenant missing but accepted")
		}
	})
}
