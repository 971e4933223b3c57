package main

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	"github.com/vigilhealth/vigil/simulator"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

// TestStreamExactlyOnceUnderSIGKILL replays the same recorded ward into two
// brokers. On the first, `vigil stream` runs uninterrupted over the whole
// input. On the second the input arrives in stages while `vigil stream`
// runs, and each stage's process is killed with SIGKILL at a random point
// while that stage's input is still arriving (so it dies mid-processing:
// inside or between transactions, after some checkpoints and before
// others), then restarted; a last process gets the last stage and is left
// to finish. The features, scores and alerts topics (read committed) and
// the ClickHouse tables the sink fills must be equal: nothing lost,
// nothing duplicated, the same values. The restarted processes must have
// replayed input from their checkpoints (stream.checkpoint_interval is
// short here), so that path is what the kills test.
//
// VIGIL_EO_KILLS sets the number of kills (default 4, 2 with -short); run
// it in a loop with -count to shake out rare interleavings.
func TestStreamExactlyOnceUnderSIGKILL(t *testing.T) {
	kills := 4
	if testing.Short() {
		kills = 2
	}
	if v := os.Getenv("VIGIL_EO_KILLS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("VIGIL_EO_KILLS=%q: want a positive number (%v)", v, err)
		}
		kills = n
	}
	ch := testenv.ClickHouse(t)
	seed := time.Now().UnixNano()
	t.Logf("random kill points from seed %d", seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 1))

	batches := recordedWard(t)
	ref := newReplayTarget(t, ch)
	ref.publish(t, batches)
	killed := newReplayTarget(t, ch)

	// Reference: one uninterrupted run.
	p := ref.startStream(t)
	ref.waitCaughtUp(t, 3*time.Minute)
	p.stop(t, 30*time.Second)

	// Killed at random points while its input arrives, restarted each time.
	stages := kills + 1
	stage := func(i int) []*vigilv1.SampleBatch {
		return batches[i*len(batches)/stages : (i+1)*len(batches)/stages]
	}
	var replayed int64
	for i := range kills {
		p := killed.startStream(t)
		feedEnd := time.Now().Add(feedTime)
		fed := killed.feed(t, stage(i))
		// Once it is past start-up (restore, replay) and committing, kill
		// it at a random point of the rest of the stage's feed.
		killed.waitProgress(t, 60*time.Second)
		if left := time.Until(feedEnd) * 4 / 5; left > time.Millisecond {
			time.Sleep(time.Duration(rng.Int64N(int64(left))))
		}
		published, committed := killed.published(t), killed.committed(t)
		if err := p.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		<-p.done
		feeding := true
		select {
		case <-fed:
			feeding = false
		default:
		}
		t.Logf("kill %d: stream group at %d of %d input records published so far", i+1, committed, published)
		if !feeding {
			t.Errorf("kill %d did not land mid-processing: its stage's input had all arrived (the process took more than %s to start)", i+1, feedTime)
		}
		<-fed
		if i > 0 {
			replayed += replayedRecords(t, p.out.String())
		}
	}
	p = killed.startStream(t)
	<-killed.feed(t, stage(kills))
	killed.waitCaughtUp(t, 3*time.Minute)
	p.stop(t, 30*time.Second)
	replayed += replayedRecords(t, p.out.String())
	t.Logf("restarted processes replayed %d input records from their checkpoints", replayed)
	if replayed == 0 {
		t.Errorf("no restarted process replayed input: the kills did not exercise the checkpoint replay")
	}

	for _, topic := range []string{ref.cfg.Kafka.Topics.Features, ref.cfg.Kafka.Topics.Scores, ref.cfg.Kafka.Topics.Alerts} {
		want, got := ref.outputs(t, topic), killed.outputs(t, topic)
		if len(want) == 0 {
			t.Fatalf("%s: the reference run produced nothing", topic)
		}
		compareOutputs(t, topic, want, got)
	}

	// ClickHouse: the sink of each broker fills its own database.
	refSink := ref.startSink(t)
	killedSink := killed.startSink(t)
	for _, table := range []string{"features", "scores", "alerts"} {
		want := ref.waitRows(t, table)
		got := killed.waitRows(t, table)
		if len(want) == 0 {
			t.Fatalf("clickhouse %s: the reference run stored nothing", table)
		}
		compareOutputs(t, "clickhouse "+table, want, got)
	}
	refSink.stop(t, 30*time.Second)
	killedSink.stop(t, 30*time.Second)
}

// replayedRecords sums the replayed_records of the restores a vigil
// stream process logged.
func replayedRecords(t *testing.T, log string) int64 {
	t.Helper()
	var n int64
	for _, line := range strings.Split(log, "\n") {
		_, after, ok := strings.Cut(line, "replayed_records=")
		if !ok {
			continue
		}
		v, err := strconv.ParseInt(strings.Fields(after)[0], 10, 64)
		if err != nil {
			t.Fatalf("restore log line %q: %v", line, err)
		}
		n += v
	}
	return n
}

// recordedWard plays a deterministic ward (fixed seed, a start in the past)
// for 20 simulated minutes into sample batches of one device and 10 s each.
func recordedWard(t *testing.T) []*vigilv1.SampleBatch {
	t.Helper()
	start := time.Date(2025, 6, 1, 8, 0, 0, 0, time.UTC)
	w := simulator.NewWard(simulator.WardConfig{Beds: 60, Wearables: 20, Deteriorating: 12, Seed: 7, Start: start})
	var out []*vigilv1.SampleBatch
	open := map[string]*vigilv1.SampleBatch{}
	var buf []simulator.Reading
	end := start.Add(20 * time.Minute)
	for w.Now().Before(end) {
		buf = w.Step(buf[:0])
		for _, r := range buf {
			b := open[r.Device]
			if b == nil || r.TimeMs/10000 != b.Samples[0].EventTimeMs/10000 {
				b = &vigilv1.SampleBatch{SchemaVersion: publish.SchemaVersion, Tenant: "eo", Patient: r.Patient,
					Device: r.Device, Source: vigilv1.Source_SOURCE_REPLAY, IngestTimeMs: r.TimeMs,
					MessageId: fmt.Sprintf("%s-%d", r.Device, r.TimeMs/10000)}
				open[r.Device] = b
				out = append(out, b)
			}
			b.Samples = append(b.Samples, &vigilv1.Sample{Metric: r.Metric, Value: r.Value, Unit: r.Unit,
				EventTimeMs: r.TimeMs, Sequence: r.Seq})
		}
	}
	return out
}

// replayTarget is one broker (and ClickHouse database) the ward was
// replayed into.
type replayTarget struct {
	broker string
	cfg    config.Config
	adm    *kadm.Client
	pub    *publish.Publisher
}

func newReplayTarget(t *testing.T, ch string) *replayTarget {
	t.Helper()
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, ch)
	pub, err := publish.New(cfg, stage.Deps{Log: slog.New(slog.DiscardHandler), Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close(context.Background()) })
	cl, err := kgo.NewClient(kgo.SeedBrokers(broker))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return &replayTarget{broker: broker, cfg: cfg, adm: kadm.NewClient(cl), pub: pub}
}

// publish writes batches to the samples topic (acknowledged when it
// returns).
func (rt *replayTarget) publish(t *testing.T, batches []*vigilv1.SampleBatch) {
	t.Helper()
	for i := 0; i < len(batches); i += 500 {
		if err := rt.pub.Publish(context.Background(), batches[i:min(i+500, len(batches))]); err != nil {
			t.Error(err)
			return
		}
	}
}

// feedTime is how long feed spreads a stage's input over.
const feedTime = 2 * time.Second

// feed publishes batches in the background, in 100 pieces spread over
// feedTime; the channel is closed when all are published.
func (rt *replayTarget) feed(t *testing.T, batches []*vigilv1.SampleBatch) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		const pieces = 100
		tick := time.NewTicker(feedTime / pieces)
		defer tick.Stop()
		for i := range pieces {
			rt.publish(t, batches[i*len(batches)/pieces:(i+1)*len(batches)/pieces])
			<-tick.C
		}
	}()
	return done
}

// published is the number of records in the samples topic.
func (rt *replayTarget) published(t *testing.T) int64 {
	t.Helper()
	ends, err := rt.adm.ListEndOffsets(context.Background(), rt.cfg.Kafka.Topics.Samples)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	ends.Each(func(o kadm.ListedOffset) { n += o.Offset })
	return n
}

func (rt *replayTarget) args(cmd string) []string {
	return []string{cmd, "--brokers", rt.broker, "--data-dir", rt.cfg.DataDir,
		"--set", "kafka.partitions=" + strconv.Itoa(int(rt.cfg.Kafka.Partitions)),
		"--set", "stream.instance_id=eo-test", "--set", "status.interval=0s",
		// Checkpoints every 300 ms: a kill leaves input to replay.
		"--set", "stream.checkpoint_interval=300ms",
		"--clickhouse", rt.cfg.ClickHouse.Addr, "--set", "clickhouse.database=" + rt.cfg.ClickHouse.Database,
		"--http", "127.0.0.1:0"}
}

func (rt *replayTarget) startStream(t *testing.T) *proc {
	return startVigil(t, rt.args("stream")...)
}

func (rt *replayTarget) startSink(t *testing.T) *proc {
	return startVigil(t, rt.args("sink")...)
}

// committed is the stream group's committed input offsets, summed.
func (rt *replayTarget) committed(t *testing.T) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	offs, err := rt.adm.FetchOffsets(ctx, rt.cfg.Stream.Group)
	if err != nil {
		return 0
	}
	var n int64
	offs.Each(func(o kadm.OffsetResponse) {
		if o.Topic == rt.cfg.Kafka.Topics.Samples && o.At > 0 {
			n += o.At
		}
	})
	return n
}

// waitCaughtUp waits until the group has committed every published
// record.
func (rt *replayTarget) waitCaughtUp(t *testing.T, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for end := rt.published(t); rt.committed(t) < end; {
		if time.Now().After(deadline) {
			t.Fatalf("stream committed %d of %d input records within %s", rt.committed(t), end, limit)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitProgress waits until the group committed more than before (the
// process is past start-up).
func (rt *replayTarget) waitProgress(t *testing.T, limit time.Duration) {
	t.Helper()
	before := rt.committed(t)
	deadline := time.Now().Add(limit)
	for rt.committed(t) == before {
		if time.Now().After(deadline) {
			t.Fatalf("stream group committed nothing new within %s (at %d)", limit, before)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// outputs reads topic (committed records only) as canonical text, one entry
// per record, with the processing-time fields cleared.
func (rt *replayTarget) outputs(t *testing.T, topic string) []string {
	t.Helper()
	var out []string
	for _, r := range testenv.ReadAll(t, rt.broker, topic) {
		var m proto.Message
		switch topic {
		case rt.cfg.Kafka.Topics.Features:
			m = &vigilv1.FeatureWindow{}
		case rt.cfg.Kafka.Topics.Scores:
			m = &vigilv1.Score{}
		default:
			m = &vigilv1.AlertEvent{}
		}
		if err := proto.Unmarshal(r.Value, m); err != nil {
			t.Fatalf("%s: %v", topic, err)
		}
		clearProcessingTime(m.ProtoReflect())
		js, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, string(r.Key)+" "+string(js))
	}
	sort.Strings(out)
	return out
}

// clearProcessingTime zeroes the fields that depend on when the processor
// ran, not on the data: *emitted_time_ms.
func clearProcessingTime(m protoreflect.Message) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case strings.HasSuffix(string(fd.Name()), "emitted_time_ms"):
			m.Clear(fd)
		case fd.Kind() == protoreflect.MessageKind && fd.IsList():
			for i := 0; i < v.List().Len(); i++ {
				clearProcessingTime(v.List().Get(i).Message())
			}
		case fd.Kind() == protoreflect.MessageKind && !fd.IsMap():
			clearProcessingTime(v.Message())
		}
		return true
	})
}

// waitRows reads table (every row, no FINAL: duplicates must show) once its
// row count has been stable for two seconds.
func (rt *replayTarget) waitRows(t *testing.T, table string) []string {
	t.Helper()
	ctx := context.Background()
	// The sink process creates the database and tables when it starts:
	// wait for them.
	deadline := time.Now().Add(2 * time.Minute)
	var conn driver.Conn
	for {
		var err error
		if conn, err = chsink.Open(ctx, rt.cfg.ClickHouse); err == nil {
			if err = conn.Exec(ctx, "SELECT count() FROM "+table); err == nil {
				break
			}
			conn.Close()
		}
		if time.Now().After(deadline) {
			t.Fatalf("clickhouse %s not there within 2m of starting the sink: %v", table, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	defer conn.Close()
	cols := map[string]string{
		"features": "tenant, patient, metric, kind, size_ms, window_start_ms, window_end_ms, version, count, mean, min, max, std, last",
		"scores":   "tenant, patient, id, kind, value, band, ruleset_hash, event_time_ms",
		"alerts":   "tenant, patient, alert_id, event_id, type, severity, event_time_ms",
	}[table]
	var last uint64
	stableSince := time.Now()
	deadline = time.Now().Add(2 * time.Minute)
	for {
		var n uint64
		if err := conn.QueryRow(ctx, "SELECT count() FROM "+table).Scan(&n); err != nil {
			t.Fatalf("counting %s: %v", table, err)
		}
		if n != last {
			last, stableSince = n, time.Now()
		}
		if n > 0 && time.Since(stableSince) > 2*time.Second {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: row count not stable within 2m (last %d)", table, n)
		}
		time.Sleep(200 * time.Millisecond)
	}
	rows, err := conn.Query(ctx, "SELECT toString(tuple("+cols+")) FROM "+table)
	if err != nil {
		t.Fatalf("reading %s: %v", table, err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			t.Fatal(err)
		}
		out = append(out, s)
	}
	sort.Strings(out)
	return out
}

// compareOutputs reports missing, extra and differing entries.
func compareOutputs(t *testing.T, what string, want, got []string) {
	t.Helper()
	if len(want) == len(got) {
		same := true
		for i := range want {
			if want[i] != got[i] {
				same = false
				break
			}
		}
		if same {
			t.Logf("%s: %d records, identical", what, len(want))
			return
		}
	}
	count := func(xs []string) map[string]int {
		m := map[string]int{}
		for _, x := range xs {
			m[x]++
		}
		return m
	}
	w, g := count(want), count(got)
	var missing, extra int
	for k, n := range w {
		if g[k] < n {
			missing += n - g[k]
			if missing <= 3 {
				t.Errorf("%s: missing after kills: %s", what, k)
			}
		}
	}
	for k, n := range g {
		if w[k] < n {
			extra += n - w[k]
			if extra <= 3 {
				t.Errorf("%s: extra (duplicate or different) after kills: %s", what, k)
			}
		}
	}
	t.Errorf("%s: %d records uninterrupted, %d with kills: %d missing, %d extra", what, len(want), len(got), missing, extra)
}
