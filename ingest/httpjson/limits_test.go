package httpjson

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// startReg is start that also returns the metrics registry.
func startReg(t *testing.T, mutate func(*config.Config)) (*env, *prometheus.Registry) {
	t.Helper()
	brokerAddr := testenv.Kafka(t)
	cfg := testenv.Config(t, brokerAddr, "")
	if mutate != nil {
		mutate(&cfg)
	}
	reg := prometheus.NewRegistry()
	deps := stage.Deps{Log: testenv.Logger(t), Metrics: reg}
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
	return &env{url: srv.URL + Path, broker: brokerAddr, cfg: cfg}, reg
}

// allSamples reads the samples topic to its end.
func allSamples(t *testing.T, e *env) []*vigilv1.SampleBatch {
	t.Helper()
	var out []*vigilv1.SampleBatch
	for _, r := range testenv.ReadAll(t, e.broker, e.cfg.Kafka.Topics.Samples) {
		var b vigilv1.SampleBatch
		if err := proto.Unmarshal(r.Value, &b); err != nil {
			t.Fatal(err)
		}
		out = append(out, &b)
	}
	return out
}

func TestDuplicateSequenceAcceptedNotRepublished(t *testing.T) {
	e, reg := startReg(t, nil)
	ms := time.Now().Add(-time.Second).UnixMilli()
	sample := func(seq int) map[string]any {
		return map[string]any{"metric": "heart_rate", "value": 70 + seq, "time_ms": ms + int64(seq), "seq": seq}
	}
	body := func(samples ...map[string]any) map[string]any {
		return map[string]any{"tenant": "st-mary", "patient": "p-1", "device": "bed-3", "samples": samples}
	}
	for i, tc := range []struct {
		samples []map[string]any
	}{
		{[]map[string]any{sample(1), sample(2), sample(3)}},
		// A retry after a lost answer, with one new sample and one repeated
		// inside the request.
		{[]map[string]any{sample(1), sample(2), sample(3), sample(4), sample(4)}},
		// Sequence 0 means "no sequence": never deduplicated.
		{[]map[string]any{sample(0)}},
		{[]map[string]any{sample(0)}},
	} {
		resp, out := postJSON(t, e.url, body(tc.samples...))
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: status %d: %s", i, resp.StatusCode, out)
		}
		var acc Accepted
		if err := json.Unmarshal(out, &acc); err != nil || acc.Accepted != len(tc.samples) {
			t.Fatalf("request %d: answer %s, want all %d accepted", i, out, len(tc.samples))
		}
	}
	seqs := map[uint64]int{}
	for _, b := range allSamples(t, e) {
		for _, s := range b.Samples {
			seqs[s.Sequence]++
		}
	}
	want := map[uint64]int{0: 2, 1: 1, 2: 1, 3: 1, 4: 1}
	for seq, n := range want {
		if seqs[seq] != n {
			t.Errorf("sequence %d published %d times, want %d (all: %v)", seq, seqs[seq], n, seqs)
		}
	}
	if got := counterValue(t, reg, "vigil_ingest_duplicates_total", "http"); got != 4 {
		t.Errorf("vigil_ingest_duplicates_total{source=http} = %v, want 4", got)
	}
}

// TestReplayingGatewayLimitedLiveMonitorNot: a gateway replaying its
// history as fast as it can gets 429s with Retry-After, while a live
// monitor (another source) keeps getting 200s.
func TestReplayingGatewayLimitedLiveMonitorNot(t *testing.T) {
	const rate, burst = 500, 1000
	e, reg := startReg(t, func(c *config.Config) {
		c.Ingest.RateLimit.SamplesPerSecond = rate
		c.Ingest.RateLimit.Burst = burst
		c.Ingest.BackfillAge = 0
	})
	old := time.Now().Add(-2 * time.Minute).UnixMilli()
	// Warm up (the first publish creates the topic's producer state).
	if resp, out := postJSON(t, e.url, map[string]any{"tenant": "st-mary", "patient": "p-0", "device": "warm-up",
		"samples": []map[string]any{{"metric": "heart_rate", "value": 80, "time_ms": time.Now().UnixMilli() - 10}}}); resp.StatusCode != http.StatusOK {
		t.Fatalf("warm-up: %d %s", resp.StatusCode, out)
	}
	var (
		wg                      sync.WaitGroup
		gwOK, gw429, gwAccepted int
		retryAfterSeen          bool
		monitorCodes            = map[int]int{}
		stop                    = make(chan struct{})
	)
	start := time.Now()
	wg.Add(2)
	// The gateway replays for a fixed time rather than a fixed number of
	// requests: refused requests come back at once, and the monitor must
	// have time to send while the gateway hammers the server.
	const replayFor = 2 * time.Second
	go func() { // the gateway: batches of 200 old samples, back to back
		defer wg.Done()
		defer close(stop)
		seq := 0
		for time.Since(start) < replayFor {
			samples := make([]map[string]any, 200)
			for i := range samples {
				seq++
				samples[i] = map[string]any{"metric": "spo2", "value": 97, "time_ms": old - int64(seq), "seq": seq}
			}
			resp, out := postJSON(t, e.url, map[string]any{"tenant": "st-mary", "patient": "p-9", "device": "gw-replay", "samples": samples})
			switch resp.StatusCode {
			case http.StatusOK:
				gwOK++
				gwAccepted += len(samples)
			case http.StatusTooManyRequests:
				gw429++
				var p Problem
				if err := json.Unmarshal(out, &p); err != nil || p.Reason != "rate_limited" || p.Accepted != 0 || p.Status != 429 ||
					resp.Header.Get("Content-Type") != "application/problem+json" {
					t.Errorf("429 answer %s (%v)", out, err)
				}
				if ra := resp.Header.Get("Retry-After"); ra != "" && ra != "0" {
					retryAfterSeen = true
				}
			default:
				t.Errorf("gateway got %d: %.300s", resp.StatusCode, out)
				return
			}
		}
	}()
	go func() { // the live monitor: one sample every 20ms
		defer wg.Done()
		seq := 0
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			seq++
			resp, out := postJSON(t, e.url, map[string]any{"tenant": "st-mary", "patient": "p-1", "device": "bed-1",
				"samples": []map[string]any{{"metric": "heart_rate", "value": 80, "time_ms": time.Now().UnixMilli() - 10, "seq": seq}}})
			monitorCodes[resp.StatusCode]++
			if resp.StatusCode != http.StatusOK {
				t.Errorf("live monitor got %d: %s", resp.StatusCode, out)
			}
		}
	}()
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	t.Logf("gateway: %d accepted requests (%d samples), %d refused with 429; monitor: %v; %.2fs", gwOK, gwAccepted, gw429, monitorCodes, elapsed)
	if gw429 == 0 || !retryAfterSeen {
		t.Fatalf("the replaying gateway was never refused with 429 and Retry-After (%d ok)", gwOK)
	}
	// One request every 20ms for 2s: about 100, each answered 200 (checked
	// above); on a loaded machine fewer, but far more than a starved
	// monitor would get.
	if monitorCodes[http.StatusOK] < 25 {
		t.Errorf("the live monitor got only %d answers 200 in %.2fs", monitorCodes[http.StatusOK], elapsed)
	}
	// The gateway got no more than its bucket and the sustained rate, and
	// more than its bucket alone: it is slowed to the rate, not shut out.
	if limit := burst + rate*elapsed + 200; float64(gwAccepted) > limit {
		t.Errorf("gateway accepted %d samples in %.2fs, more than the limit allows (%.0f)", gwAccepted, elapsed, limit)
	}
	if gwAccepted <= burst {
		t.Errorf("gateway accepted %d samples in %.2fs: nothing after its burst of %d, want the sustained %d/s", gwAccepted, elapsed, burst, rate)
	}
	if got := counterValue(t, reg, "vigil_ingest_rate_limited_total", "http"); got != float64(gw429) {
		t.Errorf("vigil_ingest_rate_limited_total{source=http} = %v, want %d", got, gw429)
	}
	// Nothing of a refused request is on the topic.
	n := 0
	for _, b := range allSamples(t, e) {
		if b.Device == "gw-replay" {
			n += len(b.Samples)
		}
	}
	if n != gwAccepted {
		t.Errorf("%d gateway samples on the topic, %d accepted", n, gwAccepted)
	}
}

// counterValue reads the counter name{source=source} from reg.
func counterValue(t *testing.T, reg *prometheus.Registry, name, source string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "source" && l.GetValue() == source {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no %s{source=%q}", name, source)
	return 0
}

// TestRetryAfterIsHonourable: a sender over its limit that waits the
// Retry-After it was given is accepted; one that does not is refused again.
func TestRetryAfterIsHonourable(t *testing.T) {
	e, _ := startReg(t, func(c *config.Config) {
		c.Ingest.RateLimit.SamplesPerSecond = 100
		c.Ingest.RateLimit.Burst = 100
	})
	now := time.Now().Add(-time.Second).UnixMilli()
	seq := 0
	body := func(n int) map[string]any {
		samples := make([]map[string]any, n)
		for i := range samples {
			seq++
			samples[i] = map[string]any{"metric": "heart_rate", "value": 70, "time_ms": now + int64(seq), "seq": seq}
		}
		return map[string]any{"tenant": "st-mary", "patient": "p-1", "device": "hub-2", "samples": samples}
	}
	if resp, out := postJSON(t, e.url, body(100)); resp.StatusCode != http.StatusOK {
		t.Fatalf("the burst: %d %s", resp.StatusCode, out)
	}
	resp, out := postJSON(t, e.url, body(50))
	p := problemOf(t, resp, out, http.StatusTooManyRequests)
	ra, err := strconv.Atoi(resp.Header.Get("Retry-After"))
	if err != nil || ra != 1 || p.Reason != "rate_limited" {
		t.Fatalf("Retry-After %q (%v), reason %q; want 1 second (50 samples at 100/s) and rate_limited", resp.Header.Get("Retry-After"), err, p.Reason)
	}
	if resp, _ := postJSON(t, e.url, body(50)); resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("sent again at once: %d, want 429", resp.StatusCode)
	}
	time.Sleep(time.Duration(ra) * time.Second)
	if resp, out := postJSON(t, e.url, body(50)); resp.StatusCode != http.StatusOK {
		t.Fatalf("after waiting Retry-After: %d %s", resp.StatusCode, out)
	}
}
