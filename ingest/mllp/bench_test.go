package mllp

import (
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/ingest/hl7"
	"github.com/vigilhealth/vigil/internal/testenv"
)

// benchSend runs the whole MLLP path (real TCP, the server, the real
// Publisher into the test broker) for b.N PCD-01 messages of 7 samples
// over conns connections. Each connection sends one message, waits for its
// ACK (as MLLP senders do), then the next; when every is > 0 each
// connection sends at most one message per every (paced). It returns the
// ACK latencies (from writing the frame to reading its ACK).
func benchSend(b *testing.B, conns int, every time.Duration) []time.Duration {
	b.Helper()
	broker := testenv.Kafka(b)
	cfg := testenv.Config(b, broker, "")
	cfg.MLLP.MaxConnections = conns
	srv := startServer(b, cfg, nil, Options{})
	now := time.Now().Add(-time.Minute)
	// Messages are built before the clock starts.
	msgs := make([][]byte, b.N)
	for i := range msgs {
		// Distinct event times: no observation is a repeat of another.
		at := now.Add(time.Duration(i) * time.Millisecond)
		msgs[i] = AppendFrame(nil, []byte(pcd(fmt.Sprintf("B%d-%d", i, now.UnixNano()), fmt.Sprintf("P%d", i%500), fmt.Sprintf("DEV%d", i%500), at, 70, "\r")))
	}
	clients := make([]net.Conn, conns)
	for i := range clients {
		c, err := net.Dial("tcp", srv.Addr())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		clients[i] = c
	}
	lat := make([]time.Duration, b.N)
	var next atomic.Int64
	var failed atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for ci, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := NewReader(c, 1<<20)
			tick := start.Add(time.Duration(ci) * every / time.Duration(conns))
			for {
				i := int(next.Add(1)) - 1
				if i >= len(msgs) {
					return
				}
				if every > 0 {
					time.Sleep(time.Until(tick))
					tick = tick.Add(every)
				}
				t := time.Now()
				if _, err := c.Write(msgs[i]); err != nil {
					failed.Add(1)
					return
				}
				ack, err := r.Next()
				lat[i] = time.Since(t)
				if err != nil {
					failed.Add(1)
					return
				}
				m, err := hl7.Parse(ack)
				if err != nil {
					failed.Add(1)
					return
				}
				if code, _ := msa(m); code != hl7.AA {
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if n := failed.Load(); n > 0 {
		b.Fatalf("%d of %d messages not acknowledged AA", n, b.N)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(float64(b.N*7)/elapsed.Seconds(), "samples/s")
	slices.Sort(lat)
	pct := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))]) / 1e6 }
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(0, "ns/op")
	return lat
}

// BenchmarkMLLPThroughput: as many ORU^R01 messages per second as 100
// connections get acknowledged (target ≥ 10,000 msgs/s). Run with e.g.
// -benchtime=50000x.
func BenchmarkMLLPThroughput(b *testing.B) {
	benchSend(b, 100, 0)
}

// BenchmarkMLLPAckLatency2000: ACK latency at a steady 2,000 messages/s
// over 20 connections (target p99 ≤ 20 ms). Run with e.g.
// -benchtime=10000x (5 s of traffic).
func BenchmarkMLLPAckLatency2000(b *testing.B) {
	benchSend(b, 20, 10*time.Millisecond)
}
