package publish

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func batch(tenant, patient string, n int) *vigilv1.SampleBatch {
	b := &vigilv1.SampleBatch{Tenant: tenant, Patient: patient, Device: "bed-1", Source: vigilv1.Source_SOURCE_HTTP, MessageId: "m-" + patient}
	for i := range n {
		b.Samples = append(b.Samples, &vigilv1.Sample{Metric: "heart_rate", Value: float64(60 + i%40), Unit: "/min",
			EventTimeMs: 1_795_000_000_000 + int64(i)*1000, Sequence: uint64(i + 1)})
	}
	return b
}

func newPublisher(t *testing.T, broker string) (*Publisher, *prometheus.Registry) {
	t.Helper()
	cfg := testenv.Config(t, broker, "")
	reg := prometheus.NewRegistry()
	p, err := New(cfg, stage.Deps{Log: testenv.Logger(t), Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close(context.Background()) })
	return p, reg
}

func TestPublishAcknowledgedRecordsOnTopic(t *testing.T) {
	broker := testenv.Kafka(t)
	p, reg := newPublisher(t, broker)
	in := []*vigilv1.SampleBatch{batch("st-mary", "p-1", 3), batch("st-mary", "p-2", 2), batch("general", "p-1", 1)}
	if err := p.Publish(context.Background(), in); err != nil {
		t.Fatal(err)
	}
	recs := testenv.Consume(t, broker, "vigil.samples.v1", 3, 10*time.Second)
	if len(recs) != 3 {
		t.Fatalf("got %d records, want 3", len(recs))
	}
	byKey := map[string]*vigilv1.SampleBatch{}
	for _, r := range recs {
		var b vigilv1.SampleBatch
		if err := proto.Unmarshal(r.Value, &b); err != nil {
			t.Fatal(err)
		}
		byKey[string(r.Key)] = &b
		if len(r.Headers) != 0 {
			t.Errorf("record has headers %v", r.Headers)
		}
	}
	for _, want := range in {
		key := want.Tenant + "/" + want.Patient
		got := byKey[key]
		if got == nil {
			t.Fatalf("no record keyed %s (keys %v)", key, byKey)
		}
		if got.SchemaVersion != 1 || got.IngestTimeMs == 0 || len(got.Samples) != len(want.Samples) || got.MessageId != want.MessageId {
			t.Errorf("record %s: %v", key, got)
		}
	}
	if n := testutil.ToFloat64(p.m.accepted.WithLabelValues("http")); n != 6 {
		t.Errorf("samples accepted metric %v, want 6", n)
	}
	if n := testutil.ToFloat64(p.m.batches.WithLabelValues("http")); n != 3 {
		t.Errorf("batches metric %v, want 3", n)
	}
	if n, err := testutil.GatherAndCount(reg, "vigil_ingest_publish_seconds"); err != nil || n != 1 {
		t.Errorf("publish histogram: %d series, %v", n, err)
	}
}

func TestLargeBatchIsSplit(t *testing.T) {
	broker := testenv.Kafka(t)
	p, _ := newPublisher(t, broker)
	b := batch("st-mary", "p-big", 20000)
	for _, s := range b.Samples {
		s.Channel = "channel-with-a-rather-long-name-0123456789"
	}
	if err := p.Publish(context.Background(), []*vigilv1.SampleBatch{b}); err != nil {
		t.Fatal(err)
	}
	recs := testenv.Consume(t, broker, "vigil.samples.v1", 2, 10*time.Second)
	total := 0
	seqs := map[uint64]bool{}
	for _, r := range recs {
		if len(r.Value) > MaxRecordBytes {
			t.Errorf("record of %d bytes", len(r.Value))
		}
		var got vigilv1.SampleBatch
		if err := proto.Unmarshal(r.Value, &got); err != nil {
			t.Fatal(err)
		}
		if got.Patient != "p-big" || got.MessageId != "m-p-big" {
			t.Errorf("split record lost its header: %v", got.Patient)
		}
		total += len(got.Samples)
		for _, s := range got.Samples {
			seqs[s.Sequence] = true
		}
	}
	if len(recs) < 2 || total != 20000 || len(seqs) != 20000 {
		t.Errorf("got %d records with %d samples (%d distinct), want ≥2 records with all 20000", len(recs), total, len(seqs))
	}
}

func TestDeadLetterTruncatesRaw(t *testing.T) {
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, "")
	cfg.Ingest.DeadLetterRawLimit = 16
	reg := prometheus.NewRegistry()
	p, err := New(cfg, stage.Deps{Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(context.Background())
	raw := bytes.Repeat([]byte("x"), 100)
	err = p.DeadLetter(context.Background(), []*vigilv1.DeadLetter{
		{Reason: "out_of_range", Message: "too high", Source: vigilv1.Source_SOURCE_HTTP, Field: "samples[1].value", Raw: raw},
		{Reason: "invalid_json", Message: "bad", Source: vigilv1.Source_SOURCE_MLLP, Raw: []byte("short")},
	})
	if err != nil {
		t.Fatal(err)
	}
	recs := testenv.Consume(t, broker, "vigil.deadletter.v1", 2, 10*time.Second)
	got := map[string]*vigilv1.DeadLetter{}
	for _, r := range recs {
		var dl vigilv1.DeadLetter
		if err := proto.Unmarshal(r.Value, &dl); err != nil {
			t.Fatal(err)
		}
		got[string(r.Key)] = &dl
	}
	h := got["http"]
	if h == nil || len(h.Raw) != 16 || h.RawSize != 100 || !h.RawTruncated || h.Field != "samples[1].value" || h.RefusedTimeMs == 0 || h.SchemaVersion != 1 {
		t.Errorf("http dead letter: %v", h)
	}
	m := got["mllp"]
	if m == nil || string(m.Raw) != "short" || m.RawSize != 5 || m.RawTruncated {
		t.Errorf("mllp dead letter: %v", m)
	}
	if n := testutil.ToFloat64(p.m.dead.WithLabelValues("http", "out_of_range")); n != 1 {
		t.Errorf("deadletters metric %v, want 1", n)
	}
}

func TestConcurrentPublish(t *testing.T) {
	broker := testenv.Kafka(t)
	p, _ := newPublisher(t, broker)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for g := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 5 {
				if err := p.Publish(context.Background(), []*vigilv1.SampleBatch{batch("t", fmt.Sprintf("p-%d-%d", g, i), 10)}); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := testutil.ToFloat64(p.m.accepted.WithLabelValues("http")); n != 1000 {
		t.Errorf("accepted %v samples, want 1000", n)
	}
	if recs := testenv.Consume(t, broker, "vigil.samples.v1", 100, 10*time.Second); len(recs) != 100 {
		t.Errorf("got %d records, want 100", len(recs))
	}
}

func TestKafkaUnavailableIsRetriableAndBounded(t *testing.T) {
	// A port nobody listens on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cfg := testenv.Config(t, "", "")
	cfg.Kafka.Brokers = []string{addr}
	cfg.Kafka.ProduceTimeout = 500 * time.Millisecond
	p, err := New(cfg, stage.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(context.Background())
	start := time.Now()
	err = p.Publish(context.Background(), []*vigilv1.SampleBatch{batch("t", "p", 1)})
	took := time.Since(start)
	if err == nil {
		t.Fatal("publish to an absent broker succeeded")
	}
	if !IsRetriable(err) {
		t.Errorf("error %v not retriable", err)
	}
	if took > 3*time.Second {
		t.Errorf("publish took %s with a 500ms produce timeout", took)
	}
	if err := p.Ping(context.Background()); err == nil || !IsRetriable(err) {
		t.Errorf("ping: %v", err)
	}
}

func TestCloseIsIdempotentAndRefusesLaterCalls(t *testing.T) {
	broker := testenv.Kafka(t)
	p, _ := newPublisher(t, broker)
	if err := p.Publish(context.Background(), []*vigilv1.SampleBatch{batch("t", "p", 1)}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := p.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	err := p.Publish(context.Background(), []*vigilv1.SampleBatch{batch("t", "p", 1)})
	if !errors.Is(err, ErrClosed) || !IsRetriable(err) {
		t.Errorf("publish after close: %v", err)
	}
}

func TestClassify(t *testing.T) {
	cases := []struct {
		err       error
		retriable bool
	}{
		{context.DeadlineExceeded, true},
		{fmt.Errorf("waiting: %w", context.DeadlineExceeded), true},
		{kgo.ErrRecordTimeout, true},
		{kgo.ErrMaxBuffered, true},
		{kerr.NotLeaderForPartition, true},
		{kerr.RequestTimedOut, true},
		{&net.OpError{Op: "dial", Err: errors.New("connection refused")}, true},
		{ErrClosed, true},
		{kerr.MessageTooLarge, false},
		{fmt.Errorf("producing: %w", kerr.RecordListTooLarge), false},
		{kerr.TopicAuthorizationFailed, false},
		{kerr.InvalidRecord, false},
	}
	for _, c := range cases {
		if got := Classify(c.err); got != c.retriable {
			t.Errorf("Classify(%v) = %v, want %v", c.err, got, c.retriable)
		}
	}
}

func TestTwoPublishersShareMetrics(t *testing.T) {
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, "")
	reg := prometheus.NewRegistry()
	for range 2 {
		p, err := New(cfg, stage.Deps{Metrics: reg})
		if err != nil {
			t.Fatalf("second publisher on one registry: %v", err)
		}
		defer p.Close(context.Background())
	}
}
