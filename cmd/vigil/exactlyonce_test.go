package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

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
// brokers. On the first, `vigil stream` runs uninterrupted; on the second it
// is killed with SIGKILL at random points of the replay and restarted, again
// and again, then left to finish. The features, scores and alerts topics
// (read committed) and the ClickHouse tables the sink fills must be equal:
// nothing lost, nothing duplicated, the same values.
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
		if err != nil {
			t.Fatalf("VIGIL_EO_KILLS=%q: %v", v, err)
		}
		kills = n
	}
	ch := testenv.ClickHouse(t)
	seed := time.Now().UnixNano()
	t.Logf("random kill points from seed %d", seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 1))

	batches := recordedWard(t)
	ref := newReplayTarget(t, ch, batches)
	killed := newReplayTarget(t, ch, batches)

	// Reference: one uninterrupted run.
	p := ref.startStream(t)
	ref.waitCaughtUp(t, 3*time.Minute)
	p.stop(t, 30*time.Second)

	// Killed at random points, restarted each time.
	for i := range kills {
		p := killed.startStream(t)
		// Wait until it has started consuming (or a little), then kill
		// it at a random point of its work.
		killed.waitProgress(t, 60*time.Second)
		time.Sleep(time.Duration(rng.IntN(1500)) * time.Millisecond)
		if err := p.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		<-p.done
		t.Logf("kill %d: stream group at %d of %d input records", i+1, killed.committed(t), killed.inputEnd)
	}
	p = killed.startStream(t)
	killed.waitCaughtUp(t, 3*time.Minute)
	p.stop(t, 30*time.Second)

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
	broker   string
	cfg      config.Config
	adm      *kadm.Client
	inputEnd int64
}

func newReplayTarget(t *testing.T, ch string, batches []*vigilv1.SampleBatch) *replayTarget {
	t.Helper()
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, ch)
	pub, err := publish.New(cfg, stage.Deps{Log: testenv.Logger(t), Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for i := 0; i < len(batches); i += 500 {
		if err := pub.Publish(ctx, batches[i:min(i+500, len(batches))]); err != nil {
			t.Fatal(err)
		}
	}
	_ = pub.Close(ctx)
	cl, err := kgo.NewClient(kgo.SeedBrokers(broker))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	rt := &replayTarget{broker: broker, cfg: cfg, adm: kadm.NewClient(cl)}
	ends, err := rt.adm.ListEndOffsets(ctx, cfg.Kafka.Topics.Samples)
	if err != nil {
		t.Fatal(err)
	}
	ends.Each(func(o kadm.ListedOffset) { rt.inputEnd += o.Offset })
	return rt
}

func (rt *replayTarget) args(cmd string) []string {
	return []string{cmd, "--brokers", rt.broker, "--data-dir", rt.cfg.DataDir,
		"--set", "kafka.partitions=" + strconv.Itoa(int(rt.cfg.Kafka.Partitions)),
		"--set", "stream.instance_id=eo-test", "--set", "status.interval=0s",
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

func (rt *replayTarget) waitCaughtUp(t *testing.T, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for rt.committed(t) < rt.inputEnd {
		if time.Now().After(deadline) {
			t.Fatalf("stream committed %d of %d input records within %s", rt.committed(t), rt.inputEnd, limit)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitProgress waits until the group committed more than before (the
// process is past start-up), or limit passes.
func (rt *replayTarget) waitProgress(t *testing.T, limit time.Duration) {
	t.Helper()
	before := rt.committed(t)
	deadline := time.Now().Add(limit)
	for rt.committed(t) == before && before < rt.inputEnd && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
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
	conn, err := chsink.Open(ctx, rt.cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cols := map[string]string{
		"features": "tenant, patient, metric, kind, size_ms, window_start_ms, window_end_ms, version, count, mean, min, max, std, last",
		"scores":   "tenant, patient, id, kind, value, band, ruleset_hash, event_time_ms",
		"alerts":   "tenant, patient, alert_id, event_id, type, severity, event_time_ms",
	}[table]
	var last uint64
	stableSince := time.Now()
	deadline := time.Now().Add(2 * time.Minute)
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
