package httpjson

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/broker"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func TestMain(m *testing.M) { testenv.Main(m) }

type env struct {
	url    string
	broker string
	cfg    config.Config
}

// start runs the handler behind a real HTTP server publishing to a fresh
// kfake broker.
func start(t testing.TB, mutate func(*config.Config)) *env {
	t.Helper()
	brokerAddr := testenv.Kafka(t)
	cfg := testenv.Config(t, brokerAddr, "")
	if mutate != nil {
		mutate(&cfg)
	}
	return startWith(t, cfg, brokerAddr)
}

func startWith(t testing.TB, cfg config.Config, brokerAddr string) *env {
	t.Helper()
	reg := prometheus.NewRegistry()
	var log *slog.Logger
	if tt, ok := t.(*testing.T); ok {
		log = testenv.Logger(tt)
	}
	deps := stage.Deps{Log: log, Metrics: reg}
	pub, err := publish.New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	h, err := New(cfg, deps, pub)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle(Path, h)
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		srv.Close()
		_ = pub.Close(context.Background())
	})
	return &env{url: srv.URL + Path, broker: brokerAddr, cfg: cfg}
}

func post(t testing.TB, url, contentType string, body []byte) (*http.Response, []byte) {
	t.Helper()
	resp, err := http.Post(url, contentType, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, out
}

func postJSON(t testing.TB, url string, v any) (*http.Response, []byte) {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return post(t, url, "application/json", b)
}

func problemOf(t *testing.T, resp *http.Response, body []byte, status int) Problem {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("status %d, want %d: %s", resp.StatusCode, status, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/problem+json" {
		t.Errorf("Content-Type %q, want application/problem+json", ct)
	}
	var p Problem
	if err := json.Unmarshal(body, &p); err != nil {
		t.Fatalf("problem body: %v: %s", err, body)
	}
	if p.Status != status || p.Title == "" || !strings.HasPrefix(p.Type, ProblemTypeBase) {
		t.Errorf("problem %+v", p)
	}
	return p
}

func batches(t *testing.T, e *env, n int) []*vigilv1.SampleBatch {
	t.Helper()
	var out []*vigilv1.SampleBatch
	for _, r := range testenv.Consume(t, e.broker, e.cfg.Kafka.Topics.Samples, n, 10*time.Second) {
		var b vigilv1.SampleBatch
		if err := proto.Unmarshal(r.Value, &b); err != nil {
			t.Fatal(err)
		}
		if string(r.Key) != b.Tenant+"/"+b.Patient {
			t.Errorf("record key %q for %s/%s", r.Key, b.Tenant, b.Patient)
		}
		out = append(out, &b)
	}
	return out
}

func deadLetters(t *testing.T, e *env, n int) []*vigilv1.DeadLetter {
	t.Helper()
	var out []*vigilv1.DeadLetter
	for _, r := range testenv.Consume(t, e.broker, e.cfg.Kafka.Topics.DeadLetter, n, 10*time.Second) {
		var d vigilv1.DeadLetter
		if err := proto.Unmarshal(r.Value, &d); err != nil {
			t.Fatal(err)
		}
		if string(r.Key) != "http" {
			t.Errorf("dead letter key %q, want http", r.Key)
		}
		out = append(out, &d)
	}
	return out
}

func TestGoodBatchCanonicalUnits(t *testing.T) {
	e := start(t, nil)
	now := time.Now().UTC()
	ts := now.Add(-time.Second).Format(time.RFC3339Nano)
	ms := now.Add(-2 * time.Second).UnixMilli()
	resp, body := postJSON(t, e.url, map[string]any{
		"tenant": "st-mary", "patient": "p-001", "device": "bed-7", "message_id": "gw-1",
		"samples": []map[string]any{
			{"metric": "heart_rate", "value": 72, "unit": "/min", "time": ts, "seq": 1},
			{"metric": "body_temperature", "value": 101.3, "unit": "[degF]", "time_ms": ms, "seq": 2},
			{"loinc": "8480-6", "value": 16, "unit": "kPa", "time_ms": ms, "seq": 3},
			{"metric": "spo2", "value": 0.97, "unit": "1", "time_ms": ms, "seq": 4},
			{"patient": "p-002", "device": "bed-8", "metric": "respiratory_rate", "value": 18, "time_ms": ms, "seq": 1},
		},
	})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	var acc Accepted
	if err := json.Unmarshal(body, &acc); err != nil || acc.Accepted != 5 {
		t.Fatalf("answer %s (%v), want accepted 5", body, err)
	}
	got := batches(t, e, 2)
	if len(got) != 2 {
		t.Fatalf("%d batches on the topic, want 2 (one per patient/device)", len(got))
	}
	byPatient := map[string]*vigilv1.SampleBatch{}
	for _, b := range got {
		byPatient[b.Patient] = b
		if b.Tenant != "st-mary" || b.Source != vigilv1.Source_SOURCE_HTTP || b.MessageId != "gw-1" || b.IngestTimeMs == 0 || b.SchemaVersion != 1 {
			t.Errorf("batch header %v", b)
		}
	}
	p1 := byPatient["p-001"]
	if p1 == nil || p1.Device != "bed-7" || len(p1.Samples) != 4 {
		t.Fatalf("p-001 batch: %v", p1)
	}
	want := []struct {
		metric    string
		value     float64
		unit      string
		converted bool
	}{
		{"heart_rate", 72, "/min", false},
		{"body_temperature", 38.5, "Cel", true},
		{"systolic_bp", 120.0098521, "mm[Hg]", true},
		{"spo2", 97, "%", true},
	}
	for i, w := range want {
		s := p1.Samples[i]
		conv := s.Quality&uint32(vigilv1.QualityFlag_QUALITY_CONVERTED) != 0
		if s.Metric != w.metric || math.Abs(s.Value-w.value) > 1e-6 || s.Unit != w.unit || conv != w.converted || s.Sequence != uint64(i+1) {
			t.Errorf("sample %d: %v, want %+v", i, s, w)
		}
	}
	if p1.Samples[0].EventTimeMs != now.Add(-time.Second).UnixMilli() {
		t.Errorf("RFC 3339 time read as %d", p1.Samples[0].EventTimeMs)
	}
	if p1.Samples[2].SourceCode != "LOINC:8480-6" {
		t.Errorf("source code %q", p1.Samples[2].SourceCode)
	}
	if p2 := byPatient["p-002"]; p2 == nil || p2.Device != "bed-8" || len(p2.Samples) != 1 || p2.Samples[0].Unit != "/min" {
		t.Errorf("p-002 batch: %v", p2)
	}
}

func TestMixedBatchPartialAcceptance(t *testing.T) {
	e := start(t, nil)
	now := time.Now().UnixMilli()
	samples := []string{
		fmt.Sprintf(`{"metric":"heart_rate","value":80,"unit":"/min","time_ms":%d,"seq":1}`, now),
		fmt.Sprintf(`{"metric":"heart_rate","value":900,"unit":"/min","time_ms":%d,"seq":2}`, now),
		fmt.Sprintf(`{"metric":"spo2","value":97,"unit":"mm[Hg]","time_ms":%d,"seq":3}`, now),
		fmt.Sprintf(`{"metric":"no_such_metric","value":1,"time_ms":%d,"seq":4}`, now),
		fmt.Sprintf(`{"metric":"respiratory_rate","value":16,"unit":"/min","time_ms":%d,"seq":5}`, now+1000),
		fmt.Sprintf(`{"metric":"heart_rate","valeu":70,"time_ms":%d,"seq":6}`, now),
		fmt.Sprintf(`{"metric":"heart_rate","value":70,"time_ms":%d,"seq":7}`, now+time.Hour.Milliseconds()),
		fmt.Sprintf(`{"metric":"heart_rate","value":70,"time_ms":%d,"seq":8,"tenant":"a/b"}`, now),
	}
	body := `{"tenant":"st-mary","patient":"p-002","device":"bed-2","samples":[` + strings.Join(samples, ",\n ") + `]}`
	resp, out := post(t, e.url, "application/json; charset=utf-8", []byte(body))
	p := problemOf(t, resp, out, http.StatusBadRequest)
	if p.Accepted != 2 || p.Rejected != 6 || len(p.Errors) != 6 {
		t.Fatalf("problem %+v, want 2 accepted, 6 rejected", p)
	}
	want := map[int][2]string{
		1: {"samples[1].value", "out_of_range"},
		2: {"samples[2].unit", "unit_not_convertible"},
		3: {"samples[3].metric", "unknown_metric"},
		5: {"samples[5].valeu", "unknown_field"},
		6: {"samples[6].time_ms", "future_time"},
		7: {"samples[7].tenant", "invalid_id"},
	}
	for _, pe := range p.Errors {
		w, ok := want[pe.Index]
		if !ok || pe.Field != w[0] || pe.Reason != w[1] || pe.Message == "" {
			t.Errorf("error %+v, want %v", pe, w)
		}
	}
	if !strings.Contains(p.Detail, "2 were accepted") {
		t.Errorf("detail does not make the partial acceptance explicit: %q", p.Detail)
	}
	got := batches(t, e, 1)
	if len(got) != 1 || len(got[0].Samples) != 2 || got[0].Samples[0].Sequence != 1 || got[0].Samples[1].Sequence != 5 {
		t.Fatalf("valid samples on the topic: %v", got)
	}
	dls := deadLetters(t, e, 6)
	if len(dls) != 6 {
		t.Fatalf("%d dead letters, want 6", len(dls))
	}
	byField := map[string]*vigilv1.DeadLetter{}
	for _, d := range dls {
		byField[d.Field] = d
	}
	for idx, w := range want {
		d := byField[w[0]]
		if d == nil {
			t.Errorf("no dead letter for %s", w[0])
			continue
		}
		if d.Reason != w[1] || d.Message == "" || string(d.Raw) != samples[idx] || d.Source != vigilv1.Source_SOURCE_HTTP ||
			d.ContentType != "application/json" || d.Origin == "" || d.MessageId != p.MessageID {
			t.Errorf("dead letter %s: %v", w[0], d)
		}
		decoded := d.Batch != nil && len(d.Batch.Samples) == 1
		if w[1] == "unknown_field" {
			if decoded {
				t.Errorf("undecodable sample %s has a decoded batch", w[0])
			}
		} else if !decoded || d.Batch.Samples[0].Sequence != uint64(idx+1) || d.Batch.Patient != "p-002" {
			t.Errorf("dead letter %s lacks the decoded sample: %v", w[0], d.Batch)
		}
	}
	if b := byField["samples[1].value"].Batch; b == nil || b.Samples[0].Value != 900 {
		t.Errorf("dead letter batch does not keep the value as sent: %v", b)
	}
}

func TestInheritedBadTenantNamedAtTopLevel(t *testing.T) {
	e := start(t, nil)
	now := time.Now().UnixMilli()
	resp, out := postJSON(t, e.url, map[string]any{"tenant": "bad/tenant", "patient": "p", "device": "d",
		"samples": []map[string]any{
			{"metric": "heart_rate", "value": 70, "time_ms": now},
			{"tenant": "good", "metric": "heart_rate", "value": 70, "time_ms": now},
		}})
	p := problemOf(t, resp, out, http.StatusBadRequest)
	if p.Accepted != 1 || len(p.Errors) != 1 || p.Errors[0].Field != "tenant" || p.Errors[0].Reason != "invalid_id" || p.Errors[0].Index != 0 {
		t.Errorf("problem %+v", p)
	}
}

func TestInvalidJSON(t *testing.T) {
	e := start(t, nil)
	body := "{\"tenant\":\"t\",\"patient\":\"p\",\"device\":\"d\",\"samples\":[\n  {\"metric\":\"heart_rate\",\"value\":72,}\n]}"
	resp, out := post(t, e.url, "application/json", []byte(body))
	p := problemOf(t, resp, out, http.StatusBadRequest)
	if p.Reason != "invalid_json" || p.Offset == nil || p.Line != 2 || p.Column != 36 || p.Accepted != 0 {
		t.Errorf("problem %+v (offset %v)", p, p.Offset)
	}
	if !strings.Contains(p.Detail, "line 2, column 36") {
		t.Errorf("detail does not locate the error: %q", p.Detail)
	}
	dls := deadLetters(t, e, 1)
	if len(dls) != 1 || dls[0].Reason != "invalid_json" || string(dls[0].Raw) != body || dls[0].RawTruncated {
		t.Fatalf("dead letter %v", dls)
	}
	if recs := testenv.Consume(t, e.broker, e.cfg.Kafka.Topics.Samples, 1, 300*time.Millisecond); len(recs) != 0 {
		t.Errorf("%d sample records from an invalid body", len(recs))
	}
}

func TestUnknownTopLevelField(t *testing.T) {
	e := start(t, nil)
	resp, out := post(t, e.url, "application/json", []byte(`{"tenant":"t","patinet":"p","samples":[{"metric":"spo2","value":97,"time_ms":1}]}`))
	p := problemOf(t, resp, out, http.StatusBadRequest)
	if p.Reason != "unknown_field" || p.Field != "patinet" || !strings.Contains(p.Detail, `"patinet"`) || p.Column != 15 {
		t.Errorf("problem %+v", p)
	}
	if dls := deadLetters(t, e, 1); len(dls) != 1 || dls[0].Reason != "unknown_field" || dls[0].Field != "patinet" {
		t.Errorf("dead letters %v", dls)
	}
}

func TestOversizedBody(t *testing.T) {
	e := start(t, func(c *config.Config) {
		c.HTTP.MaxBodyBytes = 2048
		c.Ingest.DeadLetterRawLimit = 100
	})
	big := `{"samples":[` + strings.Repeat(`{"metric":"spo2","value":97,"time_ms":1},`, 100) + `{}]}`
	resp, out := post(t, e.url, "application/json", []byte(big))
	p := problemOf(t, resp, out, http.StatusRequestEntityTooLarge)
	if p.Reason != "body_too_large" || !strings.Contains(p.Detail, "2048") {
		t.Errorf("problem %+v", p)
	}
	// Without Content-Length (chunked), the bound holds while reading.
	req, _ := http.NewRequest(http.MethodPost, e.url, io.MultiReader(strings.NewReader(big)))
	req.Header.Set("Content-Type", "application/json")
	req.ContentLength = -1
	resp2, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	out2, _ := io.ReadAll(resp2.Body)
	resp2.Body.Close()
	problemOf(t, resp2, out2, http.StatusRequestEntityTooLarge)
	dls := deadLetters(t, e, 2)
	if len(dls) != 2 {
		t.Fatalf("%d dead letters", len(dls))
	}
	for _, d := range dls {
		if d.Reason != "body_too_large" || len(d.Raw) != 100 || !d.RawTruncated || d.RawSize < 2048 {
			t.Errorf("dead letter reason %s raw %d size %d truncated %v", d.Reason, len(d.Raw), d.RawSize, d.RawTruncated)
		}
	}
}

func TestTooManySamples(t *testing.T) {
	e := start(t, func(c *config.Config) { c.Ingest.MaxBatchSamples = 3 })
	body := `{"tenant":"t","patient":"p","device":"d","samples":[` + strings.Repeat(`{"metric":"spo2","value":97,"time_ms":1},`, 3) + `{}]}`
	resp, out := post(t, e.url, "application/json", []byte(body))
	p := problemOf(t, resp, out, http.StatusRequestEntityTooLarge)
	if p.Reason != "too_many_samples" || p.Field != "samples" {
		t.Errorf("problem %+v", p)
	}
}

func TestMethodAndContentType(t *testing.T) {
	e := start(t, nil)
	resp, err := http.Get(e.url)
	if err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	problemOf(t, resp, out, http.StatusMethodNotAllowed)
	if resp.Header.Get("Allow") != "POST" {
		t.Errorf("Allow %q", resp.Header.Get("Allow"))
	}
	resp, out = post(t, e.url, "text/plain", []byte(`{"samples":[]}`))
	problemOf(t, resp, out, http.StatusUnsupportedMediaType)
	resp, out = post(t, e.url, "", []byte(`{"samples":[]}`))
	problemOf(t, resp, out, http.StatusUnsupportedMediaType)
}

func TestKafkaUnavailable503(t *testing.T) {
	b, err := broker.Start(broker.Options{Listen: "127.0.0.1:0", DataDir: filepath.Join(t.TempDir(), "kafka"), Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	cfg := testenv.Config(t, b.Addr(), "")
	cfg.Kafka.ProduceTimeout = time.Second
	e := startWith(t, cfg, b.Addr())
	now := time.Now().UnixMilli()
	good := map[string]any{"tenant": "t", "patient": "p", "device": "d",
		"samples": []map[string]any{{"metric": "heart_rate", "value": 70, "time_ms": now}}}
	if resp, out := postJSON(t, e.url, good); resp.StatusCode != http.StatusOK {
		t.Fatalf("before the broker stops: %d %s", resp.StatusCode, out)
	}
	if err := b.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	resp, out := postJSON(t, e.url, good)
	p := problemOf(t, resp, out, http.StatusServiceUnavailable)
	if resp.Header.Get("Retry-After") == "" || p.Accepted != 0 {
		t.Errorf("503 without Retry-After or with accepted samples: %+v", p)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("503 took %s with a 1s produce timeout", took)
	}
}

func TestConcurrentRequests(t *testing.T) {
	e := start(t, nil)
	now := time.Now().UnixMilli()
	const clients, each = 8, 10
	errs := make(chan error, clients)
	for c := range clients {
		go func() {
			for i := range each {
				body := fmt.Sprintf(`{"tenant":"t","patient":"p-%d","device":"d-%d","samples":[{"metric":"heart_rate","value":70,"time_ms":%d,"seq":%d}]}`, c, c, now, i+1)
				resp, err := http.Post(e.url, "application/json", strings.NewReader(body))
				if err != nil {
					errs <- err
					return
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					errs <- fmt.Errorf("status %d", resp.StatusCode)
					return
				}
			}
			errs <- nil
		}()
	}
	for range clients {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := batches(t, e, clients*each); len(got) != clients*each {
		t.Errorf("%d batches on the topic, want %d", len(got), clients*each)
	}
}

// BenchmarkHandler is the whole HTTP JSON path on this machine: clients
// post batches of 1000 samples over real TCP connections to the handler
// behind a real http.Server, which validates them, applies the default rate
// limit and duplicate filter, and answers only once the real publisher has
// them acknowledged by a kfake broker over TCP. Every request carries fresh
// sequence numbers (nothing is suppressed as a duplicate) and each client is
// its own gateway (its own rate-limit bucket, within the default limit).
// It reports samples/s accepted into Kafka (wall clock, on a machine that
// may be shared) and samples per CPU-second of the whole process (clients,
// handler, publisher and the in-process kfake broker together; times the
// cores gives what the machine sustains alone), and checks afterwards that
// the topic holds exactly b.N×1000 samples.
func BenchmarkHandler(b *testing.B) {
	e := start(b, nil)
	const perRequest = 1000
	now := time.Now().UnixMilli()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	var gateways atomic.Int64
	// 8 clients per core: requests overlap their Kafka round trip, and
	// each gateway stays under the default rate limit (50,000 samples/s,
	// burst 100,000) even at 800,000 samples/s in all.
	b.SetParallelism(8)
	cpu0 := processCPU(b)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		// Each client builds its body once and then only rewrites the
		// sequence numbers (right-aligned in a fixed-width field: JSON
		// allows the leading spaces), so that the client's share of the
		// two cores stays small.
		const seqWidth = 12
		device := fmt.Sprintf("gw-%d", gateways.Add(1))
		body := append(make([]byte, 0, 128<<10), `{"tenant":"st-mary","device":"`...)
		body = append(body, device...)
		body = append(body, `","samples":[`...)
		seqAt := make([]int, perRequest)
		for i := range perRequest {
			if i > 0 {
				body = append(body, ',')
			}
			body = append(body, `{"patient":"p-`...)
			body = strconv.AppendInt(body, int64(i%20), 10)
			body = append(body, `","metric":"heart_rate","value":`...)
			body = strconv.AppendInt(body, int64(60+i%40), 10)
			body = append(body, `,"unit":"/min","time_ms":`...)
			body = strconv.AppendInt(body, now-int64(i), 10)
			body = append(body, `,"seq":`...)
			seqAt[i] = len(body)
			body = append(body, strings.Repeat(" ", seqWidth)...)
			body = append(body, '}')
		}
		body = append(body, `]}`...)
		var seq uint64
		var digits []byte
		for pb.Next() {
			for _, at := range seqAt {
				seq++
				digits = strconv.AppendUint(digits[:0], seq, 10)
				field := body[at : at+seqWidth]
				n := copy(field, "            "[:seqWidth-len(digits)])
				copy(field[n:], digits)
			}
			resp, err := client.Post(e.url, "application/json", bytes.NewReader(body))
			if err != nil {
				b.Error(err)
				return
			}
			out, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				b.Errorf("status %d: %s", resp.StatusCode, out)
				return
			}
		}
	})
	elapsed := b.Elapsed()
	cpu := processCPU(b) - cpu0
	b.StopTimer()
	n := 0
	for _, r := range testenv.ReadAll(b, e.broker, e.cfg.Kafka.Topics.Samples) {
		var batch vigilv1.SampleBatch
		if err := proto.Unmarshal(r.Value, &batch); err != nil {
			b.Fatal(err)
		}
		n += len(batch.Samples)
	}
	if n != b.N*perRequest {
		b.Fatalf("%d samples on the topic, want %d", n, b.N*perRequest)
	}
	b.ReportMetric(float64(n)/elapsed.Seconds(), "samples/s")
	b.ReportMetric(float64(n)/cpu.Seconds(), "samples/cpu-s")
}

// processCPU is the CPU time (user and system) this process used so far.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
