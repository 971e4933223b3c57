package replay

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	"github.com/vigilhealth/vigil/stream"
)

// perKey returns each record key's values in topic order, with clear
// applied to the decoded message before re-encoding it deterministically.
func perKey[M proto.Message](t testing.TB, addr, topic string, newMsg func() M, clear func(M)) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, rec := range testenv.ReadAll(t, addr, topic) {
		m := newMsg()
		if err := proto.Unmarshal(rec.Value, m); err != nil {
			t.Fatal(err)
		}
		clear(m)
		v, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		out[string(rec.Key)] = append(out[string(rec.Key)], string(v))
	}
	return out
}

func sameKeyed(t *testing.T, what string, a, b map[string][]string) {
	t.Helper()
	if len(a) != len(b) {
		t.Errorf("%s: %d keys vs %d", what, len(a), len(b))
	}
	n := 0
	for k, va := range a {
		n += len(va)
		if !slices.Equal(va, b[k]) {
			t.Errorf("%s of %s differ: %d vs %d records", what, k, len(va), len(b[k]))
		}
	}
	if n == 0 {
		t.Errorf("%s: nothing to compare", what)
	}
}

// TestReplayTwiceIdentical replays the same PSV input into two fresh
// brokers: every patient's sample batches are byte-identical (after
// clearing ingest_time_ms), in the same order; then a stream processor on
// each broker turns them into identical feature windows.
func TestReplayTwiceIdentical(t *testing.T) {
	files := psvFiles(t, 20, "p100001.psv")
	tgz := smallTarball(t, files)
	var cfgs [2]config.Config
	var addrs [2]string
	var stats [2]Stats
	for i := range 2 {
		addrs[i] = testenv.Kafka(t)
		cfgs[i] = testenv.Config(t, addrs[i], "")
		st, err := newReplayer(t, cfgs[i], Options{Lanes: 3 + i}).Run(context.Background(), []string{tgz})
		if err != nil {
			t.Fatal(err)
		}
		stats[i] = st
	}
	if stats[0].Samples != stats[1].Samples || stats[0].Samples == 0 {
		t.Fatalf("stats %+v vs %+v", stats[0], stats[1])
	}
	clearIngest := func(b *vigilv1.SampleBatch) { b.IngestTimeMs = 0 }
	newBatch := func() *vigilv1.SampleBatch { return new(vigilv1.SampleBatch) }
	sameKeyed(t, "sample batches", perKey(t, addrs[0], cfgs[0].Kafka.Topics.Samples, newBatch, clearIngest),
		perKey(t, addrs[1], cfgs[1].Kafka.Topics.Samples, newBatch, clearIngest))

	if testing.Short() {
		return
	}
	// The stream processor on each broker. Every ICU hour is its own
	// one-minute window, closed by the next hour's samples; a patient's
	// last window stays open (or closes by idle timeout), so we wait until
	// both feature topics stop growing.
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i := range 2 {
		cfg := cfgs[i]
		cfg.Stream.InstanceID = fmt.Sprintf("replay-test-%d", i)
		p, err := stream.New(cfg, stage.Deps{Log: testenv.Logger(t).With("broker", i), Metrics: prometheus.NewRegistry()})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.Run(ctx); err != nil {
				t.Errorf("stream %d: %v", i, err)
			}
			_ = p.Close(context.Background())
		}()
	}
	defer func() { cancel(); wg.Wait() }()
	newFW := func() *vigilv1.FeatureWindow { return new(vigilv1.FeatureWindow) }
	clearFW := func(f *vigilv1.FeatureWindow) { f.EmittedTimeMs = 0 }
	count := func(addr, topic string) int { return len(testenv.ReadAll(t, addr, topic)) }
	var last [2]int
	stable := 0
	for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline) && stable < 4; {
		time.Sleep(time.Second)
		c := [2]int{count(addrs[0], cfgs[0].Kafka.Topics.Features), count(addrs[1], cfgs[1].Kafka.Topics.Features)}
		if c[0] > 0 && c == last {
			stable++
		} else {
			stable = 0
		}
		last = c
	}
	t.Logf("feature windows: %d and %d", last[0], last[1])
	if stable < 4 {
		t.Fatalf("feature topics did not settle: %v", last)
	}
	sameKeyed(t, "feature windows", perKey(t, addrs[0], cfgs[0].Kafka.Topics.Features, newFW, clearFW),
		perKey(t, addrs[1], cfgs[1].Kafka.Topics.Features, newFW, clearFW))
}
