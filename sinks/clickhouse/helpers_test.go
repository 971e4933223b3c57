package chsink_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// env is one test's broker, migrated database and connection.
type env struct {
	t      testing.TB
	log    *slog.Logger
	broker string
	cfg    config.Config
	conn   driver.Conn
}

func newEnv(t testing.TB) *env {
	t.Helper()
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, testenv.ClickHouse(t))
	cfg.Sink.BatchRows = 1000
	cfg.Sink.BatchInterval = 100 * time.Millisecond
	cfg.Sink.RetryInitial = 20 * time.Millisecond
	cfg.Sink.RetryMax = 200 * time.Millisecond
	cfg.Sink.DrainTimeout = 20 * time.Second
	ctx := context.Background()
	log := testenv.Logger(t)
	if _, bench := t.(*testing.B); bench {
		log = slog.New(slog.DiscardHandler)
	}
	if err := chsink.Migrate(ctx, cfg.ClickHouse, log); err != nil {
		t.Fatal(err)
	}
	conn, err := chsink.Open(ctx, cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &env{t: t, log: log, broker: broker, cfg: cfg, conn: conn}
}

// running is a sink whose Run is going on in the background.
type running struct {
	sink   *chsink.Sink
	reg    *prometheus.Registry
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
	err    error
	final  []*dto.MetricFamily
}

// start creates a sink on cfg and runs it until stop (or the test's end).
func (e *env) start(cfg config.Config) *running {
	e.t.Helper()
	reg := prometheus.NewRegistry()
	s, err := chsink.New(cfg, stage.Deps{Log: e.log, Metrics: reg})
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{sink: s, reg: reg, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- s.Run(ctx) }()
	e.t.Cleanup(func() { _ = r.stop(e.t) })
	return r
}

// stop cancels Run, waits for it to drain and return, keeps the final
// metrics, and closes the sink (twice: Close is idempotent). It returns
// Run's error.
func (r *running) stop(t testing.TB) error {
	r.once.Do(func() {
		r.cancel()
		select {
		case r.err = <-r.done:
		case <-time.After(60 * time.Second):
			t.Errorf("sink Run did not return within 60s of cancel")
		}
		r.final = r.gather(t)
		r.close(t)
	})
	return r.err
}

func (r *running) close(t testing.TB) {
	if err := r.sink.Close(context.Background()); err != nil {
		t.Errorf("closing sink: %v", err)
	}
	if err := r.sink.Close(context.Background()); err != nil {
		t.Errorf("closing sink twice: %v", err)
	}
}

func (r *running) gather(t testing.TB) []*dto.MetricFamily {
	mfs, err := r.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return mfs
}

// metric returns the value of a counter or gauge of the sink with label
// table=table.
func (r *running) metric(t testing.TB, name, table string) float64 {
	t.Helper()
	mfs := r.final
	if mfs == nil {
		mfs = r.gather(t)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "table" && l.GetValue() == table {
					if m.GetCounter() != nil {
						return m.GetCounter().GetValue()
					}
					if m.GetHistogram() != nil {
						return float64(m.GetHistogram().GetSampleCount())
					}
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	t.Fatalf("metric %s{table=%q} not registered", name, table)
	return 0
}

// produce writes values to topic, keyed by tenant/patient when the value
// has them, and waits for the broker to acknowledge.
func (e *env) produce(topic string, msgs ...proto.Message) {
	e.t.Helper()
	recs := make([]*kgo.Record, 0, len(msgs))
	for _, m := range msgs {
		v, err := proto.Marshal(m)
		if err != nil {
			e.t.Fatal(err)
		}
		recs = append(recs, &kgo.Record{Topic: topic, Key: keyOf(m), Value: v})
	}
	e.produceRecords(recs...)
}

func keyOf(m proto.Message) []byte {
	type tp interface {
		GetTenant() string
		GetPatient() string
	}
	if _, isDL := m.(*vigilv1.DeadLetter); isDL {
		return []byte("http")
	}
	if x, ok := m.(tp); ok {
		return bus.PatientKey(x.GetTenant(), x.GetPatient())
	}
	return nil
}

func (e *env) produceRecords(recs ...*kgo.Record) {
	e.t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker), kgo.ProducerLinger(time.Millisecond))
	if err != nil {
		e.t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		e.t.Fatalf("producing: %v", err)
	}
}

// count runs a count() query.
func (e *env) count(q string, args ...any) uint64 {
	e.t.Helper()
	var n uint64
	if err := e.conn.QueryRow(context.Background(), q, args...).Scan(&n); err != nil {
		e.t.Fatalf("%s: %v", q, err)
	}
	return n
}

// waitCount polls a count() query until it returns want (or more), and
// fails the test after timeout.
func (e *env) waitCount(q string, want uint64, timeout time.Duration) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	var n uint64
	for {
		if n = e.count(q); n >= want {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s = %d after %s, want %d", q, n, timeout, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitFor polls cond until it is true or timeout passes.
func waitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// lag returns, per topic, how many records of it the sink group has not
// committed yet (end offset minus committed offset, over every partition).
func (e *env) lag(topics ...string) (map[string]int64, error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker))
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ends, err := adm.ListEndOffsets(ctx, topics...)
	if err != nil {
		return nil, err
	}
	committed, err := adm.FetchOffsets(ctx, e.cfg.Sink.Group)
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	var errs []error
	ends.Each(func(l kadm.ListedOffset) {
		if l.Err != nil {
			errs = append(errs, l.Err)
			return
		}
		var at int64
		if c, ok := committed.Lookup(l.Topic, l.Partition); ok && c.Err == nil {
			at = c.At
		}
		out[l.Topic] += l.Offset - at
	})
	return out, errors.Join(errs...)
}

// waitCommitted waits until the sink group has committed every record of
// topics.
func (e *env) waitCommitted(timeout time.Duration, topics ...string) {
	e.t.Helper()
	var last map[string]int64
	deadline := time.Now().Add(timeout)
	for {
		l, err := e.lag(topics...)
		if err == nil {
			done := true
			for _, n := range l {
				done = done && n == 0
			}
			if done {
				return
			}
		}
		last = l
		if time.Now().After(deadline) {
			e.t.Fatalf("sink group lag after %s: %v (err %v)", timeout, last, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitMembers waits until the sink group has n members that each hold at
// least one partition, so that a test knows a rebalance has finished.
func (e *env) waitMembers(n int, timeout time.Duration) {
	e.t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker))
	if err != nil {
		e.t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		groups, err := adm.DescribeGroups(ctx, e.cfg.Sink.Group)
		cancel()
		if err == nil {
			g := groups[e.cfg.Sink.Group]
			holding := 0
			for _, m := range g.Members {
				if a, ok := m.Assigned.AsConsumer(); ok && len(a.Topics) > 0 {
					holding++
				}
			}
			if g.State == "Stable" && holding == n {
				return
			}
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("sink group did not settle with %d members holding partitions within %s (err %v)", n, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

const t0 = int64(1_763_900_000_123) // 2025-11-23T12:13:20.123Z

var metrics = []struct{ id, unit, code string }{
	{"heart_rate", "/min", "MDC:147842"},
	{"spo2", "%", "MDC:150456"},
	{"respiratory_rate", "/min", "MDC:151562"},
}

// sampleBatch makes n samples of one device for one patient, sequences
// seq0.., one second apart from start.
func sampleBatch(patient, device string, seq0 uint64, n int, start int64) *vigilv1.SampleBatch {
	b := &vigilv1.SampleBatch{
		SchemaVersion: 1,
		Tenant:        "st-mary",
		Patient:       patient,
		Device:        device,
		Source:        vigilv1.Source_SOURCE_MLLP,
		IngestTimeMs:  start + int64(n)*1000 + 250,
		MessageId:     fmt.Sprintf("MSG-%s-%d", device, seq0),
		Location:      "ICU^7^2",
	}
	for i := range n {
		m := metrics[(int(seq0)+i)%len(metrics)]
		q := uint32(0)
		if i%3 == 1 {
			q = uint32(vigilv1.QualityFlag_QUALITY_CONVERTED)
		}
		b.Samples = append(b.Samples, &vigilv1.Sample{
			Metric:      m.id,
			Value:       60 + float64(seq0) + float64(i)*0.5,
			Unit:        m.unit,
			EventTimeMs: start + int64(i)*1000,
			Sequence:    seq0 + uint64(i),
			Quality:     q,
			SourceCode:  m.code,
			Channel:     fmt.Sprintf("1.%d", i%2),
		})
	}
	return b
}
