package stream

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"runtime/pprof"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

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
)

func TestMain(m *testing.M) { testenv.Main(m) }

// infoLogger logs info and above to the test log (franz-go's debug output
// would drown it).
func infoLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tlogWriter struct{ t testing.TB }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// produce writes batches to the samples topic in order, keyed by patient.
func produce(t testing.TB, cfg config.Config, batches []*vigilv1.SampleBatch) {
	t.Helper()
	cl, err := kgo.NewClient(bus.ClientOpts(cfg.Kafka, slog.New(slog.DiscardHandler))...)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	recs := make([]*kgo.Record, len(batches))
	for i, b := range batches {
		v, err := proto.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		recs[i] = &kgo.Record{Topic: cfg.Kafka.Topics.Samples, Key: bus.PatientKey(b.Tenant, b.Patient), Value: v}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		t.Fatalf("producing samples: %v", err)
	}
}

// running is a processor running in the background.
type running struct {
	p      *Processor
	reg    *prometheus.Registry
	cancel context.CancelFunc
	done   chan error
}

func start(t testing.TB, cfg config.Config, instance string) *running {
	t.Helper()
	return startWith(t, cfg, instance, nil)
}

func startWith(t testing.TB, cfg config.Config, instance string, setup func(*Processor)) *running {
	t.Helper()
	cfg.Stream.InstanceID = instance
	reg := prometheus.NewRegistry()
	p, err := New(cfg, stage.Deps{Log: infoLogger(t), Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	if setup != nil {
		setup(p)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{p: p, reg: reg, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- p.Run(ctx) }()
	return r
}

// stop cancels Run and requires it to return nil, then closes.
func (r *running) stop(t testing.TB) {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("Run returned %v after cancel, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return within 30s of cancel")
	}
	if err := r.p.Close(context.Background()); err != nil {
		t.Error(err)
	}
	if err := r.p.Close(context.Background()); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// crash waits for Run to return after the Kafka client was closed under
// it without ending its transaction (what a killed process leaves behind,
// except that the group is left at once instead of after the session
// timeout).
func (r *running) crash(t testing.TB) {
	t.Helper()
	select {
	case <-r.done:
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return within 30s of Close")
	}
	r.cancel()
}

// waitCaughtUp waits until the group's committed offsets reach the end of
// the samples topic.
func waitCaughtUp(t testing.TB, cfg config.Config, timeout time.Duration) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(cfg.Kafka.Brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	deadline := time.Now().Add(timeout)
	ctx := context.Background()
	for {
		ends, err1 := adm.ListEndOffsets(ctx, cfg.Kafka.Topics.Samples)
		committed, err2 := adm.FetchOffsets(ctx, cfg.Stream.Group)
		if err1 == nil && err2 == nil {
			behind := 0
			ends.Each(func(o kadm.ListedOffset) {
				c, ok := committed.Lookup(o.Topic, o.Partition)
				if o.Offset > 0 && (!ok || c.At < o.Offset) {
					behind++
				}
			})
			if behind == 0 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("group %s not caught up after %s (%v %v)", cfg.Stream.Group, timeout, err1, err2)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func decode[T proto.Message](t testing.TB, recs []*kgo.Record, mk func() T) []T {
	t.Helper()
	out := make([]T, len(recs))
	for i, r := range recs {
		m := mk()
		if err := proto.Unmarshal(r.Value, m); err != nil {
			t.Fatalf("decoding %s@%d: %v", r.Topic, r.Offset, err)
		}
		out[i] = m
	}
	return out
}

type topicOutputs struct {
	fws    []*vigilv1.FeatureWindow
	scores []*vigilv1.Score
	alerts []*vigilv1.AlertEvent
	dls    []*vigilv1.DeadLetter
}

func readOutputs(t testing.TB, cfg config.Config) topicOutputs {
	tp := cfg.Kafka.Topics
	return topicOutputs{
		fws:    decode(t, testenv.ReadAll(t, cfg.Kafka.Brokers[0], tp.Features), func() *vigilv1.FeatureWindow { return &vigilv1.FeatureWindow{} }),
		scores: decode(t, testenv.ReadAll(t, cfg.Kafka.Brokers[0], tp.Scores), func() *vigilv1.Score { return &vigilv1.Score{} }),
		alerts: decode(t, testenv.ReadAll(t, cfg.Kafka.Brokers[0], tp.Alerts), func() *vigilv1.AlertEvent { return &vigilv1.AlertEvent{} }),
		dls:    decode(t, testenv.ReadAll(t, cfg.Kafka.Brokers[0], tp.DeadLetter), func() *vigilv1.DeadLetter { return &vigilv1.DeadLetter{} }),
	}
}

// TestProcessorScenario runs the known scenario through kfake and checks
// the topics (read-committed) against the hand-computed values, the
// metrics, and the changelog.
func TestProcessorScenario(t *testing.T) {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	produce(t, cfg, scenarioBatches("st-mary", "p-001"))
	r := start(t, cfg, "a")
	waitCaughtUp(t, cfg, 30*time.Second)
	r.stop(t)

	out := readOutputs(t, cfg)
	checkScenario(t, out.fws, out.scores, out.alerts, out.dls)
	for _, rec := range testenv.ReadAll(t, cfg.Kafka.Brokers[0], cfg.Kafka.Topics.Scores) {
		if string(rec.Key) != "st-mary/p-001" {
			t.Errorf("score key %q", rec.Key)
		}
	}
	if recs := testenv.ReadAll(t, cfg.Kafka.Brokers[0], cfg.Kafka.Topics.DeadLetter); len(recs) != 1 || string(recs[0].Key) != "http" {
		t.Errorf("dead letter keys: %v", recs)
	}

	for name, want := range map[string]float64{
		"vigil_stream_samples_total":          31, // 6+2+2+2+3+2+5+1+5+2+1
		"vigil_stream_features_emitted_total": 6,  // 3 1-minute, 3 5-minute
		"vigil_stream_scores_emitted_total":   19, // news2 7, mews 6, qsofa 6
		"vigil_stream_late_samples_total":     1,
	} {
		if got := counterValue(t, r.reg, name, ""); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if got := counterValue(t, r.reg, "vigil_stream_alerts_emitted_total", "raised"); got != 1 {
		t.Errorf("raised alerts metric %v", got)
	}
	if got := counterValue(t, r.reg, "vigil_stream_transactions_total", ""); got < 1 {
		t.Errorf("transactions metric %v", got)
	}

	// The changelog's latest entry for the patient: minute 3 open with
	// HR 74, no open alert, on the input's partition.
	var last *kgo.Record
	for _, rec := range testenv.ReadAll(t, cfg.Kafka.Brokers[0], cfg.Kafka.Topics.State) {
		if string(rec.Key) == "st-mary/p-001" {
			last = rec
		}
	}
	samples := testenv.ReadAll(t, cfg.Kafka.Brokers[0], cfg.Kafka.Topics.Samples)
	if last == nil || last.Partition != samples[0].Partition {
		t.Fatalf("changelog record %v not on the input partition %d", last, samples[0].Partition)
	}
	var ps vigilv1.PatientState
	if err := proto.Unmarshal(last.Value, &ps); err != nil {
		t.Fatal(err)
	}
	// Heart rate: minutes 0-3 kept (for the open 5-minute windows), the
	// last one holding HR 74 at +190 s.
	hr := &vigilv1.WindowSeries{Panes: []*vigilv1.WindowPane{{}}}
	for _, ws := range ps.GetSeries() {
		if ws.Metric == "heart_rate" {
			hr = ws
		}
	}
	lastPane := hr.GetPanes()[len(hr.GetPanes())-1]
	if !ps.Panes || len(hr.Panes) != 4 || lastPane.StartMs != t0+180000 || lastPane.LastKey != 74 ||
		ps.WatermarkMs != t0+185000 || len(ps.OpenAlerts) != 0 || ps.MaxEventTimeMs != t0+190000 || ps.LastScores["news2"].GetValue() != 0 {
		t.Errorf("changelog state: %v", &ps)
	}
}

func counterValue(t testing.TB, reg *prometheus.Registry, name, label string) float64 {
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
			if label != "" && (len(m.GetLabel()) == 0 || m.GetLabel()[0].GetValue() != label) {
				continue
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

// workload is a deterministic multi-patient input: every patient reports a
// few vitals every 5 s (random walks that cross NEWS2 thresholds), with
// some samples out of order within the allowed lateness and some too late.
func workload(patients, minutes int, seed uint64) []*vigilv1.SampleBatch {
	rng := rand.New(rand.NewPCG(seed, 1))
	type vit struct {
		metric string
		v      float64
		lo, hi float64
		step   float64
	}
	base := func() []vit {
		return []vit{
			{"heart_rate", 85, 35, 150, 6}, {"respiratory_rate", 18, 6, 32, 2}, {"spo2", 95, 84, 100, 1.5},
			{"systolic_bp", 115, 80, 230, 8}, {"body_temperature", 37.2, 34.5, 40.5, 0.3}, {"consciousness", 0, 0, 1, 0},
		}
	}
	state := make([][]vit, patients)
	for i := range state {
		state[i] = base()
	}
	var out []*vigilv1.SampleBatch
	seq := 0
	for step := 0; step < minutes*12; step++ {
		for p := 0; p < patients; p++ {
			at := t0 + int64(step)*5000 + int64(p)*37
			b := &vigilv1.SampleBatch{SchemaVersion: 1, Tenant: "t", Patient: fmt.Sprintf("p-%02d", p), Device: "d",
				Source: vigilv1.Source_SOURCE_SIMULATOR, IngestTimeMs: at + 100, MessageId: fmt.Sprint(seq)}
			seq++
			for i := range state[p] {
				v := &state[p][i]
				if v.metric == "consciousness" {
					if step%24 != 0 {
						continue
					}
					v.v = float64(rng.IntN(10) / 9) // mostly alert
				} else {
					if rng.IntN(3) == 0 {
						continue // not every vital in every message
					}
					v.v = min(v.hi, max(v.lo, v.v+(rng.Float64()*2-1)*v.step))
				}
				val := v.v
				if v.metric != "body_temperature" {
					val = float64(int(val))
				} else {
					val = float64(int(val*10)) / 10
				}
				t := at
				switch rng.IntN(20) {
				case 0:
					t = at - 3000 // out of order, within out_of_orderness
				case 1:
					t = at - 75000 // too late
				}
				b.Samples = append(b.Samples, &vigilv1.Sample{Metric: v.metric, Value: val, EventTimeMs: t, Sequence: uint64(step)})
			}
			if len(b.Samples) > 0 {
				out = append(out, b)
			}
		}
	}
	return out
}

// normalized renders outputs without processing-time fields, grouped by
// patient in topic order, for comparing runs.
func normalized(t testing.TB, o topicOutputs) map[string][]string {
	out := map[string][]string{}
	opts := proto.MarshalOptions{Deterministic: true}
	add := func(kind, patient string, m proto.Message) {
		b, err := opts.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		out[kind+"/"+patient] = append(out[kind+"/"+patient], string(b))
	}
	for _, f := range o.fws {
		f = proto.Clone(f).(*vigilv1.FeatureWindow)
		f.EmittedTimeMs = 0
		add("features", f.Patient, f)
	}
	for _, s := range o.scores {
		s = proto.Clone(s).(*vigilv1.Score)
		s.EmittedTimeMs = 0
		add("scores", s.Patient, s)
	}
	for _, a := range o.alerts {
		a = proto.Clone(a).(*vigilv1.AlertEvent)
		a.EmittedTimeMs = 0
		a.Score.EmittedTimeMs = 0
		add("alerts", a.Patient, a)
	}
	for _, d := range o.dls {
		d = proto.Clone(d).(*vigilv1.DeadLetter)
		d.RefusedTimeMs = 0
		add("deadletters", d.Patient, d)
	}
	return out
}

func compareRuns(t *testing.T, want, got topicOutputs) {
	t.Helper()
	if len(want.scores) == 0 || len(want.alerts) == 0 || len(want.dls) == 0 || len(want.fws) == 0 {
		t.Fatalf("reference run too thin to compare: %d features %d scores %d alerts %d dead letters",
			len(want.fws), len(want.scores), len(want.alerts), len(want.dls))
	}
	t.Logf("reference: %d feature windows, %d scores, %d alert events, %d dead letters", len(want.fws), len(want.scores), len(want.alerts), len(want.dls))
	w, g := normalized(t, want), normalized(t, got)
	var keys []string
	for k := range w {
		keys = append(keys, k)
	}
	for k := range g {
		if _, ok := w[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		if !slices.Equal(w[k], g[k]) {
			t.Errorf("%s: %d records, reference %d; sequences differ", k, len(g[k]), len(w[k]))
		}
	}
}

// reference runs the workload uninterrupted on its own broker.
func reference(t *testing.T, batches []*vigilv1.SampleBatch) topicOutputs {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	produce(t, cfg, batches)
	r := start(t, cfg, "ref")
	waitCaughtUp(t, cfg, 60*time.Second)
	r.stop(t)
	return readOutputs(t, cfg)
}

// TestRestartEqualsUninterrupted feeds the same input to an uninterrupted
// processor and to processors that are stopped (cancelled) and crashed
// (client closed mid-transaction) repeatedly while input keeps arriving,
// and requires equal outputs: no duplicates, nothing missing, equal values.
func TestRestartEqualsUninterrupted(t *testing.T) {
	batches := workload(6, 8, 42)
	want := reference(t, batches)

	cfg := testenv.Config(t, testenv.Kafka(t), "")
	const cycles = 6
	chunk := len(batches)/(cycles+1) + 1
	feed := func(i int) { // input arrives in pieces while a processor runs
		for j := i * chunk; j < min((i+1)*chunk, len(batches)); j += 10 {
			produce(t, cfg, batches[j:min(j+10, (i+1)*chunk, len(batches))])
			time.Sleep(5 * time.Millisecond)
		}
	}
	for i := 0; i < cycles; i++ {
		if i%2 == 1 {
			r := start(t, cfg, "node-1")
			feed(i)
			r.stop(t) // graceful: whatever is in flight commits
			continue
		}
		// Crash at the second transaction, its outputs and changelog
		// written but not committed.
		crashed := make(chan struct{})
		n := 0
		r := startWith(t, cfg, "node-1", func(p *Processor) {
			p.hookBeforeEnd = func() {
				if n++; n == 2 {
					_ = p.Close(context.Background())
					close(crashed)
				}
			}
		})
		feed(i)
		select {
		case <-crashed:
		case <-time.After(20 * time.Second):
			t.Fatal("no transaction to crash in")
		}
		r.crash(t)
	}
	r := start(t, cfg, "node-1")
	feed(cycles)
	waitCaughtUp(t, cfg, 60*time.Second)
	r.stop(t)
	compareRuns(t, want, readOutputs(t, cfg))
}

// TestTwoProcessorsSplitAndRebalance runs two processors in one group:
// the second joins mid-stream (partitions move to it and their state is
// restored from the changelog) and the first leaves later (all partitions
// move back). Outputs must equal an uninterrupted single processor's.
func TestTwoProcessorsSplitAndRebalance(t *testing.T) {
	batches := workload(9, 6, 7)
	want := reference(t, batches)

	cfg := testenv.Config(t, testenv.Kafka(t), "")
	// The first instance leaves for good: as a static member it would keep
	// its partitions until its session timed out.
	cfg.Stream.StaticMembership = false
	third := len(batches) / 3
	produce(t, cfg, batches[:third])
	a := start(t, cfg, "a")
	waitCaughtUp(t, cfg, 30*time.Second)
	owned := func(r *running) float64 {
		mfs, _ := r.reg.Gather()
		for _, mf := range mfs {
			if mf.GetName() == "vigil_stream_patients" {
				return mf.GetMetric()[0].GetGauge().GetValue()
			}
		}
		return -1
	}
	b := start(t, cfg, "b")
	// The group rebalances on the first member's next heartbeat (3 s).
	for deadline := time.Now().Add(20 * time.Second); owned(b) <= 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the second processor got no partition with state within 20s")
		}
	}
	produce(t, cfg, batches[third:2*third])
	waitCaughtUp(t, cfg, 60*time.Second)
	pa, pb := owned(a), owned(b)
	t.Logf("patients held: a %v, b %v", pa, pb)
	if pa <= 0 || pb <= 0 || pa+pb != 9 {
		t.Errorf("partitions not split: a holds %v patients, b %v (want both > 0, 9 in all)", pa, pb)
	}
	a.stop(t)
	produce(t, cfg, batches[2*third:])
	waitCaughtUp(t, cfg, 60*time.Second)
	if got := owned(b); got != 9 {
		t.Errorf("after a left, b holds %v patients, want 9", got)
	}
	b.stop(t)
	compareRuns(t, want, readOutputs(t, cfg))
}

// TestPartitionMismatchFails: a changelog not co-partitioned with the
// input is refused with an error naming both topics.
func TestPartitionMismatchFails(t *testing.T) {
	addr := testenv.Kafka(t)
	cfg := config.Default()
	cfg.Kafka.Brokers = []string{addr}
	cfg.Kafka.Topics.State = "state-with-2"
	cl, err := kgo.NewClient(kgo.SeedBrokers(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	ctx := context.Background()
	if _, err := adm.CreateTopic(ctx, 3, -1, nil, cfg.Kafka.Topics.Samples); err != nil {
		t.Fatal(err)
	}
	if _, err := adm.CreateTopic(ctx, 2, -1, nil, cfg.Kafka.Topics.State); err != nil {
		t.Fatal(err)
	}
	cfg.Stream.InstanceID = "x"
	p, err := New(cfg, stage.Deps{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctx)
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	err = p.Run(rctx)
	if err == nil || !strings.Contains(err.Error(), "state-with-2 has 2 partitions") || !strings.Contains(err.Error(), cfg.Kafka.Topics.Samples+" has 3") {
		t.Fatalf("Run with mismatched partitions: %v", err)
	}
}

// BenchmarkProcessor measures samples/s through the whole stage over
// kfake: produce b.N batches of 6 samples for 200 patients, then time the
// processor from start until the group has committed them all.
func BenchmarkProcessor(b *testing.B) {
	cfg := testenv.Config(b, testenv.Kafka(b), "")
	metrics := []string{"heart_rate", "spo2", "respiratory_rate", "systolic_bp", "body_temperature", "consciousness"}
	vals := []float64{80, 97, 16, 120, 37, 0}
	batches := make([]*vigilv1.SampleBatch, b.N)
	for i := range batches {
		at := t0 + int64(i/200)*1000
		bt := &vigilv1.SampleBatch{Tenant: "t", Patient: fmt.Sprintf("p-%03d", i%200), IngestTimeMs: at}
		for j, m := range metrics {
			bt.Samples = append(bt.Samples, &vigilv1.Sample{Metric: m, Value: vals[j] + float64(i%7), EventTimeMs: at})
		}
		batches[i] = bt
	}
	produce(b, cfg, batches)
	b.ResetTimer()
	cfg.Stream.InstanceID = "bench"
	p, err := New(cfg, stage.Deps{})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	waitCaughtUp(b, cfg, 5*time.Minute)
	b.StopTimer()
	cancel()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	_ = p.Close(context.Background())
	b.ReportMetric(float64(b.N*6)/b.Elapsed().Seconds(), "samples/s")
}

// BenchmarkAlertLatency measures, at low load (one batch in flight at a
// time), the time from producing a sample batch to its alert event being
// visible read-committed on the alerts topic. Batches alternate between
// vitals that raise (NEWS2 6) and resolve (0) the aggregate alert.
func BenchmarkAlertLatency(b *testing.B) {
	cfg := testenv.Config(b, testenv.Kafka(b), "")
	cfg.Stream.InstanceID = "latency"
	p, err := New(cfg, stage.Deps{})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	defer func() {
		cancel()
		<-done
		_ = p.Close(context.Background())
	}()
	alerts, err := kgo.NewClient(kgo.SeedBrokers(cfg.Kafka.Brokers...), kgo.ConsumeTopics(cfg.Kafka.Topics.Alerts),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.FetchMaxWait(time.Second))
	if err != nil {
		b.Fatal(err)
	}
	defer alerts.Close()
	prod, err := kgo.NewClient(bus.ClientOpts(cfg.Kafka, slog.New(slog.DiscardHandler))...)
	if err != nil {
		b.Fatal(err)
	}
	defer prod.Close()
	lats := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		at := t0 + int64(i)*1000
		hr, rr := 80.0, 16.0
		if i%2 == 0 {
			hr, rr = 131, 25
		}
		sent := time.Now()
		v, _ := proto.Marshal(&vigilv1.SampleBatch{Tenant: "t", Patient: "p", IngestTimeMs: sent.UnixMilli(), Samples: []*vigilv1.Sample{
			{Metric: "heart_rate", Value: hr, EventTimeMs: at}, {Metric: "respiratory_rate", Value: rr, EventTimeMs: at},
		}})
		if err := prod.ProduceSync(context.Background(), &kgo.Record{Topic: cfg.Kafka.Topics.Samples, Key: []byte("t/p"), Value: v}).FirstErr(); err != nil {
			b.Fatal(err)
		}
		pctx, pcancel := context.WithTimeout(context.Background(), 10*time.Second)
		for got := 0; got == 0 && pctx.Err() == nil; {
			got = alerts.PollFetches(pctx).NumRecords()
		}
		pcancel()
		lats = append(lats, time.Since(sent))
	}
	b.StopTimer()
	slices.Sort(lats)
	b.ReportMetric(float64(lats[len(lats)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lats[len(lats)*99/100].Microseconds())/1000, "p99-ms")
}

// BenchmarkStreamEndToEnd is issue 5's throughput figure: records of 8
// samples (10,000 patients × 8 metrics, one record per patient every 15 s
// of event time) are pre-produced into the samples topic of an embedded
// broker in this process. The processor is started and joins the group;
// the timer (and the CPU-time count and profile) starts once it has
// restored its assigned partitions' state, which is when it begins
// fetching and processing (no input is applied before: the samples all
// lie ahead of the committed offsets), and runs until the group has
// committed all of them, that is until every feature window they closed
// is committed on the features topic. That measures steady-state
// throughput: the one-off group join and restore (about 100 ms, the same
// whatever the input) are left out, as they are a few seconds' share of
// a long-running stage's work. The process runs with vigil's runtime
// settings (config.Runtime.Apply of the defaults, as every vigil command
// does; VIGIL_BENCH_RUNTIME=go runs with Go's). A read-committed consumer then checks that
// every patient's closed 1-minute windows are there. It reports samples/s
// and samples per CPU-second. Run it with a fixed record count, e.g.
// -benchtime=400000x.
func BenchmarkStreamEndToEnd(b *testing.B) {
	const patients, perRecord, stepMs = 10000, 8, 15000
	cfg := testenv.Config(b, testenv.Kafka(b), "")
	cfg.Stream.InstanceID = "e2e"
	// The runtime settings vigil applies at start (runtime.gc_percent,
	// runtime.memory_limit: the defaults, through the same code path);
	// VIGIL_BENCH_RUNTIME=go keeps Go's own instead.
	if os.Getenv("VIGIL_BENCH_RUNTIME") != "go" {
		defer cfg.Runtime.Apply()()
	}
	metrics := [perRecord]string{"heart_rate", "spo2", "respiratory_rate", "body_temperature",
		"systolic_bp", "diastolic_bp", "mean_arterial_pressure", "consciousness"}
	base := [perRecord]float64{80, 97, 16, 37, 120, 80, 93, 0}
	n := b.N
	recs := make([]*kgo.Record, 0, min(n, 50000))
	flush := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cl, err := kgo.NewClient(append(bus.ClientOpts(cfg.Kafka, slog.New(slog.DiscardHandler)), kgo.ProducerLinger(0))...)
		if err != nil {
			b.Fatal(err)
		}
		defer cl.Close()
		if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
			b.Fatalf("producing samples: %v", err)
		}
		recs = recs[:0]
	}
	for i := 0; i < n; i++ {
		p, step := i%patients, int64(i/patients)
		at := t0 + step*stepMs + int64(p%1000)
		bt := &vigilv1.SampleBatch{SchemaVersion: 1, Tenant: "t", Patient: fmt.Sprintf("p-%05d", p), Device: "d",
			Source: vigilv1.Source_SOURCE_SIMULATOR, IngestTimeMs: at, Samples: make([]*vigilv1.Sample, perRecord)}
		for j := range metrics {
			bt.Samples[j] = &vigilv1.Sample{Metric: metrics[j], Value: base[j] + float64((i+j)%5), EventTimeMs: at, Sequence: uint64(step)}
		}
		v, err := proto.Marshal(bt)
		if err != nil {
			b.Fatal(err)
		}
		recs = append(recs, &kgo.Record{Topic: cfg.Kafka.Topics.Samples, Key: bus.PatientKey(bt.Tenant, bt.Patient), Value: v})
		if len(recs) == cap(recs) {
			flush()
		}
	}
	flush()

	reg := prometheus.NewRegistry()
	p, err := New(cfg, stage.Deps{Log: slog.New(slog.DiscardHandler), Metrics: reg})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	// Joined and restored: the restore histogram has its observation.
	for restored := false; !restored; {
		var m dto.Metric
		if err := p.m.restoreTime.Write(&m); err != nil {
			b.Fatal(err)
		}
		if restored = m.GetHistogram().GetSampleCount() > 0; !restored {
			select {
			case err := <-done:
				b.Fatalf("processor stopped before its partitions were assigned: %v", err)
			case <-time.After(time.Millisecond):
			}
		}
	}
	// VIGIL_BENCH_CPUPROFILE profiles the timed part only (-cpuprofile
	// would include producing the input and checking the output).
	stopProfile := func() {}
	if path := os.Getenv("VIGIL_BENCH_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
		stopProfile = pprof.StopCPUProfile
		defer stopProfile()
	}
	cpu0 := cpuTime()
	b.ResetTimer()
	waitCaughtUp(b, cfg, 10*time.Minute)
	b.StopTimer()
	stopProfile()
	elapsed := b.Elapsed()
	// The box is shared: CPU seconds (processor and broker, both in this
	// process) per sample say more than wall time when others are busy.
	b.ReportMetric(float64(n*perRecord)/(cpuTime()-cpu0).Seconds(), "samples/cpu-s")
	cancel()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	_ = p.Close(context.Background())
	b.ReportMetric(float64(n*perRecord)/elapsed.Seconds(), "samples/s")
	b.ReportMetric(counterValue(b, reg, "vigil_stream_transactions_total", ""), "txns")

	// Every patient's 1-minute windows that the input closed are committed.
	steps := int64((n + patients - 1) / patients)
	if steps < 2 {
		return
	}
	lastFull := int64(n / patients) // steps every patient reached
	closedMinutes := ((lastFull-1)*stepMs - cfg.Stream.OutOfOrderness.Milliseconds()) / 60000
	if closedMinutes < 1 {
		return
	}
	perPatient := map[string]int64{}
	for _, r := range testenv.ReadAll(b, cfg.Kafka.Brokers[0], cfg.Kafka.Topics.Features) {
		var fw vigilv1.FeatureWindow
		if err := proto.Unmarshal(r.Value, &fw); err != nil {
			b.Fatal(err)
		}
		if fw.Kind == vigilv1.WindowKind_WINDOW_KIND_TUMBLING && fw.SizeMs == 60000 {
			perPatient[fw.Patient]++
		}
	}
	if len(perPatient) != patients {
		b.Fatalf("1-minute features of %d patients committed, want %d", len(perPatient), patients)
	}
	for pt, got := range perPatient {
		if got < closedMinutes {
			b.Fatalf("patient %s: %d closed 1-minute windows committed, want at least %d", pt, got, closedMinutes)
		}
	}
}

// cpuTime is the CPU time (user and system) this process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestCrashAfterCheckpointReplaysBoundedSpan: a processor with a short
// checkpoint interval is abandoned mid-transaction (no commit) after it
// has written checkpoints and gone on for more transactions; its successor
// restores the checkpointed states, replays the input since the
// partitions' checkpoints, and the outputs equal an uninterrupted run's.
// The replay covers about one checkpoint interval of input, not the
// partitions' history.
func TestCrashAfterCheckpointReplaysBoundedSpan(t *testing.T) {
	batches := workload(6, 30, 11)
	want := reference(t, batches)

	cfg := testenv.Config(t, testenv.Kafka(t), "")
	cfg.Stream.CheckpointInterval = 300 * time.Millisecond
	var (
		crashNow atomic.Bool
		crashed  = make(chan time.Time, 1)
	)
	r := startWith(t, cfg, "node-1", func(p *Processor) {
		p.hookBeforeEnd = func() {
			if crashNow.Load() && len(crashed) == 0 {
				_ = p.Close(context.Background())
				crashed <- time.Now()
			}
		}
	})
	// Input arrives at about 270 records/s; the crash comes after three
	// quarters of it.
	type piece struct {
		at time.Time
		n  int
	}
	var pieces []piece
	var crashAt time.Time
	for i := 0; i < len(batches); i += 5 {
		produce(t, cfg, batches[i:min(i+5, len(batches))])
		pieces = append(pieces, piece{time.Now(), min(i+5, len(batches)) - i})
		if i >= len(batches)*3/4 {
			crashNow.Store(true)
		}
		select {
		case crashAt = <-crashed:
			r.crash(t)
		default:
		}
		time.Sleep(15 * time.Millisecond)
	}
	if crashAt.IsZero() {
		select {
		case crashAt = <-crashed:
			r.crash(t)
		case <-time.After(20 * time.Second):
			t.Fatal("no transaction to crash in")
		}
	}

	// Before the crash, checkpoints were committed (the counters count
	// committed transactions only), and transactions after them.
	states := counterValue(t, r.reg, "vigil_stream_states_written_total", "")
	txns := counterValue(t, r.reg, "vigil_stream_transactions_total", "")
	if states == 0 || txns < 3 {
		t.Fatalf("crashed after %v committed transactions writing %v states: want checkpoints before the crash", txns, states)
	}
	publishedAtCrash := 0
	recent := 0 // records published in the checkpoint interval (plus slack) before the crash
	for _, p := range pieces {
		if p.at.Before(crashAt) {
			publishedAtCrash += p.n
			if crashAt.Sub(p.at) < cfg.Stream.CheckpointInterval+time.Second {
				recent += p.n
			}
		}
	}

	r2 := start(t, cfg, "node-1")
	waitCaughtUp(t, cfg, 60*time.Second)
	replayed := counterValue(t, r2.reg, "vigil_stream_replayed_records_total", "")
	r2.stop(t)
	compareRuns(t, want, readOutputs(t, cfg))
	t.Logf("crash after %d published records, %v transactions and %v state writes committed; %d records replayed (bound %d)",
		publishedAtCrash, txns, states, int(replayed), recent)
	if replayed <= 0 || int(replayed) > recent {
		t.Errorf("replayed %v records on restore, want between 1 and %d (the input of one checkpoint interval plus 1s before the crash; %d were published before it)",
			replayed, recent, publishedAtCrash)
	}
}
