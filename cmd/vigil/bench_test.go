package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

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
