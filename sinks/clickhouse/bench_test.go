package chsink_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"
)

// BenchmarkSinkSamples measures rows/s from kfake into ClickHouse: b.N
// sample batches of 100 samples (20 patients) are produced first, then the
// timer runs from starting the sink until ClickHouse accepted every row.
func BenchmarkSinkSamples(b *testing.B) {
	if testing.Short() {
		b.Skip("needs ClickHouse and a broker; skipped with -short")
	}
	const perBatch = 100
	e := newEnv(b)
	cfg := e.cfg
	cfg.Sink.BatchRows = 20000
	cfg.Sink.BatchInterval = 200 * time.Millisecond
	recs := make([]*kgo.Record, 0, b.N)
	for i := range b.N {
		sb := sampleBatch(fmt.Sprintf("p-%02d", i%20), fmt.Sprintf("bed-%02d", i%20), uint64(i*perBatch), perBatch, t0+int64(i)*1000)
		v, err := proto.Marshal(sb)
		if err != nil {
			b.Fatal(err)
		}
		recs = append(recs, &kgo.Record{Topic: cfg.Kafka.Topics.Samples, Key: keyOf(sb), Value: v})
	}
	for i := 0; i < len(recs); i += 5000 {
		e.produceRecords(recs[i:min(i+5000, len(recs))]...)
	}
	want := float64(b.N * perBatch)
	b.ResetTimer()
	start := time.Now()
	r := e.start(cfg)
	waitFor(b, "every row inserted", 10*time.Minute, func() bool {
		return r.metric(b, "vigil_sink_rows_inserted_total", "samples") >= want
	})
	took := time.Since(start)
	b.StopTimer()
	if err := r.stop(b); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(want/took.Seconds(), "rows/s")
}
