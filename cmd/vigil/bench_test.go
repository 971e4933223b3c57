package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// BenchmarkAcceptToAlert measures, through the whole in-process flow (HTTP
// ingest, embedded-protocol broker over TCP, stream processor, ClickHouse
// sink), the time from ingest accepting a sample to the alert record it
// triggers being readable (read-committed) on vigil.alerts.v1. Background
// load: `beds` patients at 1 Hz x 4 metrics posted alongside. Each iteration
// posts one deteriorated set of vitals for a fresh patient.
//
// Reported: p50_ms and p99_ms of accept-to-alert, measured from the sample's
// ingest time stamped by Vigil (AlertEvent.trigger_ingest_time_ms) to the
// consumer receiving the alert.
func BenchmarkAcceptToAlert(b *testing.B) {
	brokerAddr, chAddr := testenv.Kafka(b), testenv.ClickHouse(b)
	base, p := startPlatform(b, brokerAddr, chAddr, slog.New(slog.DiscardHandler))

	cl, err := kgo.NewClient(kgo.SeedBrokers(brokerAddr), kgo.ConsumeTopics(p.cfg.Kafka.Topics.Alerts),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtEnd()), kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.FetchMaxWait(10*time.Millisecond))
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()

	// Background load.
	const beds = 200
	loadCtx, stopLoad := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for loadCtx.Err() == nil {
			now := time.Now().UnixMilli()
			var buf bytes.Buffer
			buf.WriteString(`{"tenant":"load","device":"gw","samples":[`)
			for i := 0; i < beds; i++ {
				if i > 0 {
					buf.WriteByte(',')
				}
				fmt.Fprintf(&buf, `{"patient":"bed-%d","device":"bed-%d","metric":"heart_rate","value":%d,"time_ms":%d},`+
					`{"patient":"bed-%d","device":"bed-%d","metric":"spo2","value":97,"time_ms":%d},`+
					`{"patient":"bed-%d","device":"bed-%d","metric":"respiratory_rate","value":16,"time_ms":%d},`+
					`{"patient":"bed-%d","device":"bed-%d","metric":"systolic_bp","value":121,"time_ms":%d}`,
					i, i, 70+i%10, now, i, i, now, i, i, now, i, i, now)
			}
			buf.WriteString(`]}`)
			if resp, err := http.Post(base+"/v1/samples", "application/json", &buf); err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			select {
			case <-loadCtx.Done():
			case <-tick.C:
			}
		}
	}()
	defer func() { stopLoad(); wg.Wait() }()
	time.Sleep(2 * time.Second)

	var lat []float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		patient := fmt.Sprintf("lat-%d-%d", b.N, i)
		now := time.Now().UnixMilli()
		body := fmt.Sprintf(`{"tenant":"bench","patient":%q,"device":"d-%d","samples":[`+
			`{"metric":"respiratory_rate","value":27,"time_ms":%d},{"metric":"spo2","value":90,"time_ms":%d},`+
			`{"metric":"heart_rate","value":135,"time_ms":%d},{"metric":"systolic_bp","value":88,"time_ms":%d}]}`,
			patient, i, now, now, now, now)
		resp, err := http.Post(base+"/v1/samples", "application/json", bytes.NewBufferString(body))
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			b.Fatalf("post: %d", resp.StatusCode)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		found := false
		for !found && ctx.Err() == nil {
			fs := cl.PollFetches(ctx)
			recv := time.Now()
			fs.EachRecord(func(r *kgo.Record) {
				var ev vigilv1.AlertEvent
				if proto.Unmarshal(r.Value, &ev) != nil || ev.GetPatient() != patient || ev.GetType() != vigilv1.AlertEventType_ALERT_EVENT_RAISED {
					return
				}
				found = true
				lat = append(lat, float64(recv.UnixMicro()-ev.GetTriggerIngestTimeMs()*1000)/1000)
			})
		}
		cancel()
		if !found {
			b.Fatalf("no alert for %s within 10s", patient)
		}
	}
	b.StopTimer()
	sort.Float64s(lat)
	b.ReportMetric(lat[len(lat)/2], "p50_ms")
	b.ReportMetric(lat[(len(lat)*99)/100], "p99_ms")
}

// BenchmarkAcceptToAlertWard is the latency figure: the whole
// in-process flow (HTTP ingest, embedded-protocol broker over TCP, stream
// processor with every score table and the alert lifecycle, ClickHouse
// sink into a real server) under the load of VIGIL_BENCH_BEDS beds
// (default 10,000) x 8 metrics at 1 Hz, i.e. 80,000 samples/s, posted by
// 100 bedside gateways (one per 100 beds, each once a second, spread over
// the second). Each iteration posts one deteriorated set of vitals for a
// fresh patient and waits for its RAISED alert on vigil.alerts.v1
// (read-committed).
//
// Reported: p50_ms, p99_ms and max_ms from Vigil accepting the sample
// (AlertEvent.trigger_ingest_time_ms) to the consumer receiving the alert
// record, and the background load actually accepted (load_samples/s; the
// benchmark fails if it falls below 95 % of the target, since then the
// figure would not be the one asked for).
//
//	go test -run '^$' -bench BenchmarkAcceptToAlertWard -benchtime=400x -timeout 20m ./cmd/vigil/
func BenchmarkAcceptToAlertWard(b *testing.B) {
	beds := 10000
	if v := os.Getenv("VIGIL_BENCH_BEDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 100 {
			b.Fatalf("VIGIL_BENCH_BEDS=%q: want a number of beds >= 100", v)
		}
		beds = n
	}
	const gateways = 100
	// Stable patients: each reading moves by a step within a physiological
	// jitter (heart rate 72-74, temperature 36.9-37.1, ...), on room air.
	metrics := []struct {
		name       string
		base, step float64
	}{{"heart_rate", 72, 1}, {"spo2", 97, 1}, {"respiratory_rate", 15, 1}, {"systolic_bp", 122, 1}, {"diastolic_bp", 76, 1},
		{"mean_arterial_pressure", 91, 1}, {"body_temperature", 36.9, 0.1}, {"fio2", 21, 0}}

	brokerAddr, chAddr := testenv.Kafka(b), testenv.ClickHouse(b)
	// VIGIL_* variables tune the platform under test (e.g.
	// VIGIL_STREAM_CHECKPOINT_INTERVAL), as they do for `vigil run`.
	cfg := testenv.Config(b, brokerAddr, chAddr)
	if err := config.ApplyEnv(&cfg, os.Environ()); err != nil {
		b.Fatal(err)
	}
	// The Go runtime settings `vigil run` applies (runtime.gc_percent...).
	defer cfg.Runtime.Apply()()
	base, p := startPlatformWith(b, cfg, slog.New(slog.DiscardHandler))
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokerAddr), kgo.ConsumeTopics(p.cfg.Kafka.Topics.Alerts),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtEnd()), kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.FetchMaxWait(10*time.Millisecond))
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: gateways + 4}, Timeout: 30 * time.Second}

	// Background load: gateway g owns beds g, g+gateways, ... and posts
	// their 8 metrics once a second at offset g*10 ms.
	var accepted, failed atomic.Int64
	loadCtx, stopLoad := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	start := time.Now().Truncate(time.Second).Add(time.Second)
	for g := 0; g < gateways; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf bytes.Buffer
			for tick := 0; loadCtx.Err() == nil; tick++ {
				at := start.Add(time.Duration(tick)*time.Second + time.Duration(g)*10*time.Millisecond)
				select {
				case <-loadCtx.Done():
					return
				case <-time.After(time.Until(at)):
				}
				now := time.Now().UnixMilli()
				buf.Reset()
				fmt.Fprintf(&buf, `{"tenant":"ward","device":"gw-%d","samples":[`, g)
				n := 0
				for bed := g; bed < beds; bed += gateways {
					for k, m := range metrics {
						if n > 0 {
							buf.WriteByte(',')
						}
						v := m.base + m.step*float64((bed+tick+k)%3)
						fmt.Fprintf(&buf, `{"patient":"bed-%d","device":"mon-%d","metric":"%s","value":%g,"time_ms":%d}`, bed, bed, m.name, v, now)
						n++
					}
				}
				buf.WriteString(`]}`)
				resp, err := hc.Post(base+"/v1/samples", "application/json", bytes.NewReader(buf.Bytes()))
				if err != nil {
					failed.Add(int64(n))
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					accepted.Add(int64(n))
				} else {
					failed.Add(int64(n))
				}
			}
		}()
	}
	defer func() { stopLoad(); wg.Wait() }()
	// Warm up: every bed's state exists and the sink has settled.
	time.Sleep(time.Until(start) + 8*time.Second)

	lat := make([]float64, 0, b.N)
	acc0, t0 := accepted.Load(), time.Now()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		patient := fmt.Sprintf("probe-%d-%d", b.N, i)
		now := time.Now().UnixMilli()
		body := fmt.Sprintf(`{"tenant":"ward","patient":%q,"device":"probe-%d","samples":[`+
			`{"metric":"respiratory_rate","value":27,"time_ms":%d},{"metric":"spo2","value":90,"time_ms":%d},`+
			`{"metric":"heart_rate","value":135,"time_ms":%d},{"metric":"systolic_bp","value":88,"time_ms":%d},`+
			`{"metric":"diastolic_bp","value":50,"time_ms":%d},{"metric":"mean_arterial_pressure","value":63,"time_ms":%d},`+
			`{"metric":"body_temperature","value":39.4,"time_ms":%d},{"metric":"fio2","value":40,"time_ms":%d}]}`,
			patient, i, now, now, now, now, now, now, now, now)
		resp, err := hc.Post(base+"/v1/samples", "application/json", strings.NewReader(body))
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Fatalf("probe post: %d", resp.StatusCode)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		found := false
		for !found && ctx.Err() == nil {
			fs := cl.PollFetches(ctx)
			recv := time.Now()
			fs.EachRecord(func(r *kgo.Record) {
				var ev vigilv1.AlertEvent
				if proto.Unmarshal(r.Value, &ev) != nil || ev.GetPatient() != patient || ev.GetType() != vigilv1.AlertEventType_ALERT_EVENT_RAISED {
					return
				}
				found = true
				l := float64(recv.UnixMicro()-ev.GetTriggerIngestTimeMs()*1000) / 1000
				lat = append(lat, l)
				if os.Getenv("VIGIL_BENCH_DEBUG") != "" && l > 40 {
					fmt.Fprintf(os.Stderr, "slow probe: %.1f ms at second %.3f (emitted +%d ms)\n", l, float64(ev.GetTriggerIngestTimeMs()%60000)/1000, ev.GetEmittedTimeMs()-ev.GetTriggerIngestTimeMs())
				}
			})
		}
		cancel()
		if !found {
			b.Fatalf("no alert for %s within 10s", patient)
		}
		// Probes are spread out so that they sample the load, not each other.
		time.Sleep(20 * time.Millisecond)
	}
	b.StopTimer()
	rate := float64(accepted.Load()-acc0) / time.Since(t0).Seconds()
	sort.Float64s(lat)
	b.ReportMetric(lat[len(lat)/2], "p50_ms")
	b.ReportMetric(lat[(len(lat)*99)/100], "p99_ms")
	b.ReportMetric(lat[len(lat)-1], "max_ms")
	b.ReportMetric(rate, "load_samples/s")
	b.ReportMetric(float64(failed.Load()), "load_failed")
	// (Over at least 5 s: a shorter run sees the gateways' once-a-second
	// posts as bursts.)
	if want := float64(beds*len(metrics)) * 0.95; time.Since(t0) >= 5*time.Second && rate < want {
		b.Errorf("background load accepted %.0f samples/s, below 95%% of the %d beds x %d metrics asked for", rate, beds, len(metrics))
	}
}
