package simulator

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// ingest runs the real HTTP ingest handler over a real socket into a fresh
// kfake broker; wrap may put a handler in front of it.
func ingest(t *testing.T, wrap func(http.Handler) http.Handler) (url, broker string, cfg config.Config) {
	t.Helper()
	broker = testenv.Kafka(t)
	cfg = testenv.Config(t, broker, "")
	deps := stage.Deps{Log: testenv.Logger(t), Metrics: prometheus.NewRegistry()}
	pub, err := publish.New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	h, err := httpjson.New(cfg, deps, pub)
	if err != nil {
		t.Fatal(err)
	}
	var handler http.Handler = h
	if wrap != nil {
		handler = wrap(h)
	}
	mux := http.NewServeMux()
	mux.Handle("POST "+httpjson.Path, handler)
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		srv.Close()
		_ = pub.Close(context.Background())
	})
	return srv.URL, broker, cfg
}

type sample struct {
	batch *vigilv1.SampleBatch
	s     *vigilv1.Sample
}

func consumeSamples(t *testing.T, broker string, cfg config.Config) []sample {
	t.Helper()
	// Every sample the simulator counted as accepted was acknowledged by
	// Kafka before the answer, so it is below the high watermark now.
	var out []sample
	for _, r := range testenv.ReadAll(t, broker, cfg.Kafka.Topics.Samples) {
		var b vigilv1.SampleBatch
		if err := proto.Unmarshal(r.Value, &b); err != nil {
			t.Fatal(err)
		}
		for _, s := range b.Samples {
			out = append(out, sample{&b, s})
		}
	}
	return out
}

func simConfig(target string) config.Simulator {
	c := config.Default().Simulator
	c.Target = target
	c.Beds, c.Wearables, c.Deteriorating = 2, 1, 1
	c.PreRoll = time.Minute
	c.Speed = 20
	c.Duration = 1500 * time.Millisecond
	c.RetryMax = 200 * time.Millisecond
	return c
}

func TestSamplesArriveOnTopic(t *testing.T) {
	url, broker, cfg := ingest(t, nil)
	reg := prometheus.NewRegistry()
	sim, err := New(simConfig(url), stage.Deps{Log: testenv.Logger(t), Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close(context.Background())
	start := time.Now()
	if err := sim.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	end := time.Now()
	if took := time.Since(start); took > 4*time.Second {
		t.Errorf("Run took %s with a 1.5s duration", took)
	}
	accepted := int(testutil.ToFloat64(sim.accepted))
	if sent := int(testutil.ToFloat64(sim.sent)); accepted == 0 || sent != accepted || testutil.ToFloat64(sim.refused) != 0 {
		t.Fatalf("sent %d accepted %d refused %v", sent, accepted, testutil.ToFloat64(sim.refused))
	}
	got := consumeSamples(t, broker, cfg)
	if len(got) != accepted {
		t.Fatalf("%d samples on the topic, simulator counted %d accepted", len(got), accepted)
	}
	var minT, maxT int64 = 1 << 62, 0
	type key struct {
		dev string
		seq uint64
	}
	seen := map[key]bool{}
	metrics := map[string]bool{}
	for _, g := range got {
		minT, maxT = min(minT, g.s.EventTimeMs), max(maxT, g.s.EventTimeMs)
		k := key{g.batch.Device, g.s.Sequence}
		if seen[k] {
			t.Errorf("device %s seq %d twice", g.batch.Device, g.s.Sequence)
		}
		seen[k] = true
		metrics[g.s.Metric] = true
		if g.batch.Tenant != "demo" || !strings.HasPrefix(g.batch.MessageId, g.batch.Device+"-") {
			t.Errorf("batch header tenant %q message id %q device %q", g.batch.Tenant, g.batch.MessageId, g.batch.Device)
		}
	}
	// The pre-roll reaches a minute back, to the start of that minute.
	if d := start.UnixMilli() - minT; d < 60_000 || d > 121_000 || minT%60_000 != 0 {
		t.Errorf("earliest sample at %d, %d ms before start; want the start of the minute a minute back", minT, d)
	}
	// Speed 20 does not run simulated time past the wall clock: the
	// latest sample is from the last second or so, never from the future.
	if d := end.UnixMilli() - maxT; d < 0 || d > 2_000 {
		t.Errorf("latest sample %d ms before the end of the run; want within the last 2 s and not in the future", d)
	}
	for _, m := range []string{"heart_rate", "spo2", "respiratory_rate", "systolic_bp", "body_temperature", "consciousness", "steps"} {
		if !metrics[m] {
			t.Errorf("no %s on the topic (got %v)", m, metrics)
		}
	}
}

func TestRetriesAfter503WithoutDuplicates(t *testing.T) {
	var calls atomic.Int32
	flaky := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if calls.Add(1) <= 2 {
				w.WriteHeader(http.StatusServiceUnavailable)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
	url, broker, cfg := ingest(t, flaky)
	c := simConfig(url)
	c.Duration = time.Second
	sim, err := New(c, stage.Deps{Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if r := testutil.ToFloat64(sim.retries); r < 2 {
		t.Errorf("%v retries, want ≥ 2", r)
	}
	accepted := int(testutil.ToFloat64(sim.accepted))
	got := consumeSamples(t, broker, cfg)
	type key struct {
		dev string
		seq uint64
	}
	seen := map[key]bool{}
	for _, g := range got {
		k := key{g.batch.Device, g.s.Sequence}
		if seen[k] {
			t.Fatalf("sample %v on the topic twice", k)
		}
		seen[k] = true
	}
	if accepted == 0 || len(got) != accepted {
		t.Errorf("%d samples on the topic, %d accepted", len(got), accepted)
	}
}

func TestStopsPromptlyWhenEndpointDown(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	c := simConfig("http://" + addr)
	c.Duration = 0
	sim, err := New(c, stage.Deps{Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := sim.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 1500*time.Millisecond {
		t.Errorf("Run took %s to stop", took)
	}
	if testutil.ToFloat64(sim.retries) == 0 || testutil.ToFloat64(sim.dropped) == 0 || testutil.ToFloat64(sim.accepted) != 0 {
		t.Errorf("retries %v dropped %v accepted %v", testutil.ToFloat64(sim.retries), testutil.ToFloat64(sim.dropped), testutil.ToFloat64(sim.accepted))
	}
	if err := sim.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := sim.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestNewRefusesBadConfig(t *testing.T) {
	for _, mutate := range []func(*config.Simulator){
		func(c *config.Simulator) { c.Deteriorating = 20 },
		func(c *config.Simulator) { c.Speed = 0 },
		func(c *config.Simulator) { c.Target = "ftp://x" },
		func(c *config.Simulator) { c.Tenant = "a/b" },
	} {
		c := config.Default().Simulator
		mutate(&c)
		if _, err := New(c, stage.Deps{}); err == nil {
			t.Errorf("config %+v accepted", c)
		}
	}
}
