package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// startPlatform runs ingest, stream and sink in this process against the
// test broker and ClickHouse, logging to log, and returns the HTTP base URL.
// The platform is drained and stopped when the test ends.
func startPlatform(tb testing.TB, brokerAddr, chAddr string, log *slog.Logger) (string, *platform) {
	tb.Helper()
	return startPlatformWith(tb, testenv.Config(tb, brokerAddr, chAddr), log)
}

// startPlatformWith is startPlatform with a given configuration.
func startPlatformWith(tb testing.TB, cfg config.Config, log *slog.Logger) (string, *platform) {
	tb.Helper()
	p := newPlatform(&cliEnv{cfg: cfg, log: log, stdout: io.Discard, stderr: io.Discard})
	ctx, cancel := context.WithCancel(context.Background())
	if err := p.startInfra(ctx, false); err != nil {
		tb.Fatal(err)
	}
	if err := p.addStages(true, true, true); err != nil {
		tb.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.runner.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				tb.Errorf("platform stopped with: %v", err)
			}
		case <-time.After(60 * time.Second):
			tb.Error("platform did not stop within 60s")
		}
	})
	return "http://" + p.cfg.HTTP.Listen, p
}

type jsonSample struct {
	Metric string  `json:"metric"`
	Value  float64 `json:"value"`
	Unit   string  `json:"unit,omitempty"`
	TimeMs int64   `json:"time_ms"`
	Seq    uint64  `json:"seq,omitempty"`
}

func postSamples(t *testing.T, base string, body any) (int, []byte) {
	t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post(base+"/v1/samples", "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

// waitRows polls query until it returns want (or the deadline passes) and
// returns the last value.
func waitCount(t *testing.T, conn driver.Conn, query string, want uint64, timeout time.Duration, args ...any) uint64 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var got uint64
	for {
		row := conn.QueryRow(context.Background(), query, args...)
		if err := row.Scan(&got); err != nil {
			t.Fatalf("%s: %v", query, err)
		}
		if got >= want || time.Now().After(deadline) {
			return got
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestEndToEndKnownVitals posts a known sequence of vitals for one patient
// over HTTP and checks what lands in ClickHouse and on the alerts topic
// against values computed by hand and the published NEWS2 chart.
func TestEndToEndKnownVitals(t *testing.T) {
	brokerAddr, chAddr := testenv.Kafka(t), testenv.ClickHouse(t)
	base, p := startPlatform(t, brokerAddr, chAddr, testenv.Logger(t))

	// Minute [t0, t0+60s): a deteriorating patient. All in canonical units
	// except the temperature, sent in °F.
	t0 := time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC).UnixMilli()
	hr := []float64{118, 122, 126, 131} // at +0, +15, +30, +45 s
	var samples []jsonSample
	seq := uint64(0)
	add := func(metric string, v float64, unit string, at int64) {
		seq++
		samples = append(samples, jsonSample{Metric: metric, Value: v, Unit: unit, TimeMs: at, Seq: seq})
	}
	for i, v := range hr {
		add("heart_rate", v, "/min", t0+int64(i)*15000)
	}
	add("respiratory_rate", 23, "/min", t0+1000)
	add("spo2", 93, "%", t0+2000)
	add("systolic_bp", 98, "mm[Hg]", t0+3000)
	add("body_temperature", 101.3, "[degF]", t0+4000) // 38.5 °C
	add("consciousness", 0, "{ACVPU}", t0+5000)
	// A sample in the next minute, past the out-of-orderness bound, closes
	// the first window (same SpO2, so the score's inputs do not change).
	add("spo2", 93, "%", t0+70000)

	// The stages start concurrently: wait for readiness (bounded) before
	// checking what it reports.
	var resp *http.Response
	var ready []byte
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var err error
		if resp, err = http.Get(base + "/readyz"); err != nil {
			t.Fatal(err)
		}
		ready, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 200 || time.Now().After(deadline) {
			break
		}
	}
	if resp.StatusCode != 200 || !strings.Contains(string(ready), `"name":"clickhouse","ok":true`) || !strings.Contains(string(ready), `"name":"kafka","ok":true`) {
		t.Errorf("/readyz: %d %s", resp.StatusCode, ready)
	}

	code, body := postSamples(t, base, map[string]any{
		"tenant": "st-mary", "patient": "p-001", "device": "bed-7", "samples": samples,
	})
	if code != http.StatusOK {
		t.Fatalf("post: %d %s", code, body)
	}

	conn, err := chsink.Open(context.Background(), p.cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	// Every sample exactly once, even without FINAL.
	if n := waitCount(t, conn, "SELECT count() FROM samples WHERE patient = 'p-001'", uint64(len(samples)), 30*time.Second); n != uint64(len(samples)) {
		t.Fatalf("samples in clickhouse: %d, want %d", n, len(samples))
	}
	var temp float64
	if err := conn.QueryRow(context.Background(), "SELECT value FROM samples WHERE patient = 'p-001' AND metric = 'body_temperature'").Scan(&temp); err != nil {
		t.Fatal(err)
	}
	if math.Abs(temp-38.5) > 1e-9 {
		t.Errorf("temperature stored as %v Cel, want 38.5 (101.3 °F)", temp)
	}

	// The heart-rate feature of the first minute, computed by hand:
	// count 4, mean (118+122+126+131)/4 = 124.25, min 118, max 131, last 131.
	waitCount(t, conn, "SELECT count() FROM features WHERE patient = 'p-001' AND metric = 'heart_rate'", 1, 30*time.Second)
	var (
		count                  uint64
		mean, minV, maxV, last float64
	)
	err = conn.QueryRow(context.Background(), `SELECT count, mean, min, max, last FROM features FINAL
		WHERE patient = 'p-001' AND metric = 'heart_rate' AND window_name = '1m' AND window_start_ms = ?`, t0).Scan(&count, &mean, &minV, &maxV, &last)
	if err != nil {
		t.Fatal(err)
	}
	if count != 4 || math.Abs(mean-124.25) > 1e-9 || minV != 118 || maxV != 131 || last != 131 {
		t.Errorf("heart_rate feature: count %d mean %v min %v max %v last %v; want 4 124.25 118 131 131", count, mean, minV, maxV, last)
	}

	// NEWS2 from the published chart for RR 23 (2), SpO2 93 on scale 1 (2),
	// air (0), SBP 98 (2), pulse 131 (3), Alert (0), 38.5 °C (1) = 10, high.
	waitCount(t, conn, "SELECT count() FROM scores WHERE patient = 'p-001' AND kind = 'news2' AND value = 10", 1, 30*time.Second)
	var band string
	if err := conn.QueryRow(context.Background(), "SELECT band FROM scores WHERE patient = 'p-001' AND kind = 'news2' AND value = 10 LIMIT 1").Scan(&band); err != nil {
		t.Fatalf("no NEWS2 score of 10 for the vitals: %v", err)
	}
	if band != "high" {
		t.Errorf("NEWS2 10 band %q, want high", band)
	}

	// The alert event is on vigil.alerts.v1.
	recs := testenv.Consume(t, brokerAddr, p.cfg.Kafka.Topics.Alerts, 1, 30*time.Second)
	var raised *vigilv1.AlertEvent
	for _, r := range recs {
		var ev vigilv1.AlertEvent
		if err := proto.Unmarshal(r.Value, &ev); err != nil {
			t.Fatal(err)
		}
		if ev.GetPatient() == "p-001" && ev.GetType() == vigilv1.AlertEventType_ALERT_EVENT_RAISED {
			raised = &ev
			if string(r.Key) != "st-mary/p-001" {
				t.Errorf("alert key %q, want st-mary/p-001", r.Key)
			}
		}
	}
	if raised == nil {
		t.Fatalf("no raised alert for p-001 on %s (got %d records)", p.cfg.Kafka.Topics.Alerts, len(recs))
	}
	if raised.GetRulesetHash() == "" || raised.GetScore().GetRulesetVersion() == "" || len(raised.GetScore().GetComponents()) == 0 {
		t.Errorf("alert is not traceable: %v", raised)
	}
	// And it lands in ClickHouse.
	if n := waitCount(t, conn, "SELECT count() FROM alerts WHERE patient = 'p-001' AND type = 'raised'", 1, 30*time.Second); n != 1 {
		t.Errorf("raised alerts in clickhouse: %d, want 1", n)
	}
}

// TestBadBatch checks a mixed batch: 400 naming each bad field, the rejects
// on the dead-letter topic with reasons, and the valid samples kept.
func TestBadBatch(t *testing.T) {
	brokerAddr, chAddr := testenv.Kafka(t), testenv.ClickHouse(t)
	base, p := startPlatform(t, brokerAddr, chAddr, testenv.Logger(t))
	now := time.Now().UnixMilli()
	code, body := postSamples(t, base, map[string]any{
		"tenant": "st-mary", "patient": "p-002", "device": "bed-2",
		"samples": []map[string]any{
			{"metric": "heart_rate", "value": 80, "unit": "/min", "time_ms": now},
			{"metric": "heart_rate", "value": 900, "unit": "/min", "time_ms": now},
			{"metric": "spo2", "value": 97, "unit": "mm[Hg]", "time_ms": now},
			{"metric": "no_such_metric", "value": 1, "time_ms": now},
			{"metric": "respiratory_rate", "value": 16, "unit": "/min", "time_ms": now + 1000},
		},
	})
	if code != http.StatusBadRequest {
		t.Fatalf("mixed batch: got %d %s, want 400", code, body)
	}
	var problem struct {
		Accepted int `json:"accepted"`
		Rejected int `json:"rejected"`
		Errors   []struct {
			Index  int    `json:"index"`
			Field  string `json:"field"`
			Reason string `json:"reason"`
		} `json:"errors"`
	}
	if err := json.Unmarshal(body, &problem); err != nil {
		t.Fatalf("problem body: %v: %s", err, body)
	}
	if problem.Accepted != 2 || problem.Rejected != 3 || len(problem.Errors) != 3 {
		t.Fatalf("problem: %+v, want 2 accepted, 3 rejected", problem)
	}
	wantFields := map[int]string{1: "samples[1].value", 2: "samples[2].unit", 3: "samples[3].metric"}
	for _, e := range problem.Errors {
		if wantFields[e.Index] != e.Field || e.Reason == "" {
			t.Errorf("error %+v: want field %q and a reason", e, wantFields[e.Index])
		}
	}
	dls := testenv.Consume(t, brokerAddr, p.cfg.Kafka.Topics.DeadLetter, 3, 20*time.Second)
	reasons := map[string]int{}
	for _, r := range dls {
		var dl vigilv1.DeadLetter
		if err := proto.Unmarshal(r.Value, &dl); err != nil {
			t.Fatal(err)
		}
		reasons[dl.GetReason()]++
		if len(dl.GetRaw()) == 0 || dl.GetField() == "" {
			t.Errorf("dead letter without raw bytes or field: %v", &dl)
		}
	}
	if len(dls) != 3 {
		t.Errorf("dead letters: %d (%v), want 3", len(dls), reasons)
	}
	conn, err := chsink.Open(context.Background(), p.cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if n := waitCount(t, conn, "SELECT count() FROM samples WHERE patient = 'p-002'", 2, 30*time.Second); n != 2 {
		t.Errorf("valid samples of the mixed batch in clickhouse: %d, want 2", n)
	}
	if n := waitCount(t, conn, "SELECT count() FROM dead_letters WHERE patient = 'p-002'", 3, 30*time.Second); n != 3 {
		t.Errorf("dead letters in clickhouse: %d, want 3", n)
	}
}
