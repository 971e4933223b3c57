package stream

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/apache/arrow/go/v17/arrow/memory"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/detectors/ews"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// onlyKind returns the scores of one kind, in order.
func onlyKind(scores []*vigilv1.Score, kind string) []*vigilv1.Score {
	var out []*vigilv1.Score
	for _, s := range scores {
		if s.GetKind() == kind {
			out = append(out, s)
		}
	}
	return out
}

// scenarioSeries are the MEWS (Subbe) and qSOFA series of the known
// scenario (scenario_test.go), by hand:
//
//	+0   HR 80 RR 16 SBP 120 37.0 Alert: MEWS RR 15-20 = 1 low; qSOFA 0.
//	+60  HR 112 (2) RR 22 (2; qSOFA 1): MEWS 4 low; qSOFA 1 negative. A
//	     change score at the end of minute 0, so no window-end score there.
//	+80  HR 135 (3) RR 26 (2) SBP 95 (1; qSOFA 1) 38.6 (2): MEWS 8 high;
//	     qSOFA 2 positive.
//	+120 window-end of minute 1 from its newest values: the same 8 and 2.
//	+125 HR 75 RR 16 (1) SBP 118 37.2: MEWS 1 low; qSOFA 0 negative.
//	+180 window-end of minute 2: MEWS 1, qSOFA 0.
var scenarioSeries = map[string][]struct {
	atS   int64
	value float64
	band  string
}{
	ews.KindMEWS:  {{0, 1, "low"}, {60, 4, "low"}, {80, 8, "high"}, {120, 8, "high"}, {125, 1, "low"}, {180, 1, "low"}},
	ews.KindQSOFA: {{0, 0, "negative"}, {60, 1, "negative"}, {80, 2, "positive"}, {120, 2, "positive"}, {125, 0, "negative"}, {180, 0, "negative"}},
}

// checkScenarioTables checks the MEWS and qSOFA series of the scenario
// and that every score of every kind names its table and lists its
// components with their inputs.
func checkScenarioTables(t *testing.T, scores []*vigilv1.Score) {
	t.Helper()
	for kind, want := range scenarioSeries {
		got := onlyKind(scores, kind)
		if len(got) != len(want) {
			for _, s := range got {
				t.Logf("%s at +%ds: %v %s", kind, (s.EventTimeMs-t0)/1000, s.Value, s.Band)
			}
			t.Fatalf("%d %s scores, want %d", len(got), kind, len(want))
		}
		for i, w := range want {
			if s := got[i]; s.EventTimeMs != t0+w.atS*1000 || s.Value != w.value || s.Band != w.band {
				t.Errorf("%s score %d: +%ds %v %s, want +%ds %v %s", kind, i, (s.EventTimeMs-t0)/1000, s.Value, s.Band, w.atS, w.value, w.band)
			}
		}
	}
	ids := map[string]bool{}
	for _, s := range scores {
		r := ews.Embedded(s.Kind)
		if s.Ruleset != r.Name || s.RulesetVersion != r.Version || s.RulesetHash != r.Hash || len(s.Components) != len(r.Parameters) {
			t.Errorf("%s score names %s %s %s with %d components, want %s %s %s with %d",
				s.Kind, s.Ruleset, s.RulesetVersion, s.RulesetHash, len(s.Components), r.Name, r.Version, r.Hash, len(r.Parameters))
		}
		if ids[s.Id] {
			t.Errorf("duplicate score id %s (%s at %d)", s.Id, s.Kind, s.EventTimeMs)
		}
		ids[s.Id] = true
	}
	// MEWS at +80: every component with its input value and time.
	high := onlyKind(scores, ews.KindMEWS)[2]
	want := map[string]struct {
		metric string
		value  float64
		atS    int64
		points float64
	}{
		"systolic_bp": {"systolic_bp", 95, 80, 1}, "heart_rate": {"heart_rate", 135, 80, 3},
		"respiratory_rate": {"respiratory_rate", 26, 80, 2}, "temperature": {"body_temperature", 38.6, 80, 2},
		"avpu": {"consciousness", 0, 0, 0},
	}
	for _, c := range high.Components {
		w := want[c.Parameter]
		if c.Metric != w.metric || c.InputValue != w.value || c.InputTimeMs != t0+w.atS*1000 || c.Points != w.points || c.Missing || c.Stale {
			t.Errorf("MEWS +80 component %s: %v", c.Parameter, c)
		}
	}
	if !slices.Equal(high.TopContributors, []string{"heart_rate", "respiratory_rate", "temperature", "systolic_bp"}) {
		t.Errorf("MEWS +80 top contributors %v", high.TopContributors)
	}
}

func TestEngineScoresEveryTable(t *testing.T) {
	c := runEngine(t, scenarioBatches("st-mary", "p-001"), false)
	checkScenarioTables(t, c.scores)
	// Restored after every batch: the same scores of every kind.
	r := runEngine(t, scenarioBatches("st-mary", "p-001"), true)
	if len(r.scores) != len(c.scores) {
		t.Fatalf("%d scores after restores, %d without", len(r.scores), len(c.scores))
	}
	for i := range c.scores {
		if !proto.Equal(c.scores[i], r.scores[i]) {
			t.Errorf("score %d differs after restore:\n%v\n%v", i, c.scores[i], r.scores[i])
		}
	}
}

// TestProcessorScoresEveryTable: a patient's samples, through kfake and
// the processor, give news2, mews and qsofa scores on vigil.scores.v1,
// each naming its table's version and hash, with components.
func TestProcessorScoresEveryTable(t *testing.T) {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	produce(t, cfg, scenarioBatches("st-mary", "p-001"))
	r := start(t, cfg, "a")
	waitCaughtUp(t, cfg, 30*time.Second)
	r.stop(t)
	recs := testenv.ReadAll(t, cfg.Kafka.Brokers[0], cfg.Kafka.Topics.Scores)
	scores := decode(t, recs, func() *vigilv1.Score { return &vigilv1.Score{} })
	for i, rec := range recs {
		if string(rec.Key) != "st-mary/p-001" {
			t.Errorf("score %d (%s) key %q", i, scores[i].Kind, rec.Key)
		}
	}
	kinds := map[string]int{}
	for _, s := range scores {
		kinds[s.Kind]++
	}
	if kinds[ews.KindNEWS2] != 7 || kinds[ews.KindMEWS] != 6 || kinds[ews.KindQSOFA] != 6 {
		t.Errorf("scores per kind %v, want news2 7, mews 6, qsofa 6", kinds)
	}
	checkScenarioTables(t, scores)
	if got := counterValue(t, r.reg, "vigil_stream_scores_emitted_total", ""); got != float64(len(onlyKind(scores, ews.KindNEWS2))+12) {
		t.Errorf("scores metric %v", got)
	}
}

// scoresEngine is an engine of cfg with the checked allocator.
func scoresEngine(t *testing.T, cfg config.Config) *engine {
	t.Helper()
	mem := memory.NewCheckedAllocator(memory.NewGoAllocator())
	t.Cleanup(func() { mem.AssertSize(t, 0) })
	e, err := newEngine(cfg, nil, catalog.Default(), mem)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func batchAt(atS float64, vs map[string]float64) *vigilv1.SampleBatch {
	b := &vigilv1.SampleBatch{SchemaVersion: 1, Tenant: "t", Patient: "p", Source: vigilv1.Source_SOURCE_HTTP}
	at := t0 + int64(atS*1000)
	keys := make([]string, 0, len(vs))
	for m := range vs {
		keys = append(keys, m)
	}
	slices.Sort(keys)
	for _, m := range keys {
		b.Samples = append(b.Samples, &vigilv1.Sample{Metric: m, Value: vs[m], EventTimeMs: at})
	}
	b.IngestTimeMs = at + 100
	return b
}

// TestScoresConfig: detectors.scores chooses the tables (a site's MEWS
// file), per-parameter staleness limits, and the per-patient SpO2 scale.
func TestScoresConfig(t *testing.T) {
	site := strings.Replace(string(mustRead(t, "../detectors/ews/mews-subbe-2001.yaml")), "version: subbe-2001.1", "version: site-7", 1)
	path := filepath.Join(t.TempDir(), "mews.yaml")
	if err := os.WriteFile(path, []byte(site), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Detectors.Scores.Tables = []string{"news2", "mews"}
	cfg.Detectors.Scores.Files = map[string]string{"mews": path}
	cfg.Detectors.Scores.Staleness = 30 * time.Minute
	cfg.Detectors.Scores.Limits = map[string]time.Duration{"consciousness": 4 * time.Hour, "avpu": 10 * time.Minute}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	e := scoresEngine(t, cfg)
	p := e.newPatient("t/p", "t", "p")
	var out outputs
	defer out.release()
	var scores []*vigilv1.Score
	apply := func(b *vigilv1.SampleBatch) {
		out.reset()
		e.apply(p, b, 1, &out)
		scores = append(scores, byKind(&out).scores...)
	}
	apply(batchAt(0, map[string]float64{"consciousness": 0, "spo2_target_scale": 2}))
	// 45 minutes later: consciousness is within its 4 h NEWS2 limit but
	// past MEWS's 10 min avpu limit; SpO2 89 on scale 2 scores 0.
	apply(batchAt(45*60, map[string]float64{"heart_rate": 80, "spo2": 89, "respiratory_rate": 16, "oxygen_flow": 2}))
	news2, mews := onlyKind(scores, ews.KindNEWS2), onlyKind(scores, ews.KindMEWS)
	if len(onlyKind(scores, ews.KindQSOFA)) != 0 || len(news2) == 0 || len(mews) == 0 {
		t.Fatalf("scores %v", scores)
	}
	n, m := news2[len(news2)-1], mews[len(mews)-1]
	if m.RulesetVersion != "site-7" || m.RulesetHash == ews.Embedded(ews.KindMEWS).Hash {
		t.Errorf("MEWS from the site file: %s %s", m.RulesetVersion, m.RulesetHash)
	}
	if !slices.Equal(m.Stale, []string{"avpu"}) || slices.Contains(n.Stale, "consciousness") {
		t.Errorf("stale: news2 %v mews %v; want only MEWS avpu", n.Stale, m.Stale)
	}
	spo2 := func(s *vigilv1.Score) *vigilv1.ScoreComponent {
		for _, c := range s.Components {
			if c.Parameter == "spo2" {
				return c
			}
		}
		return nil
	}
	if c := spo2(n); c.Points != 0 || c.Band != "SpO2 scale 2: 88-92" {
		t.Errorf("scale 2 SpO2 component %v", c)
	}
	// 31 minutes on, heart rate alone: SpO2 is past the 30 min default.
	apply(batchAt(76*60, map[string]float64{"heart_rate": 81}))
	news2 = onlyKind(scores, ews.KindNEWS2)
	if n := news2[len(news2)-1]; !slices.Contains(n.Stale, "spo2") || slices.Contains(n.Stale, "pulse") {
		t.Errorf("stale after 31 min: %v", n.Stale)
	}

	// Both news2 sources set: refused.
	cfg.Stream.Ruleset = path
	cfg.Detectors.Scores.Files = map[string]string{"news2": path, "mews": path}
	cfg.Detectors.Scores.Tables = []string{"news2", "mews"}
	if _, err := newEngine(cfg, nil, catalog.Default(), memory.NewGoAllocator()); err == nil {
		t.Error("files.news2 with stream.ruleset accepted")
	}
	// A file of another kind: refused, naming the file.
	cfg.Stream.Ruleset = ""
	if _, err := newEngine(cfg, nil, catalog.Default(), memory.NewGoAllocator()); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("a mews file as news2: %v", err)
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// BenchmarkEngineScoreTables measures the per-batch engine cost (windows,
// features, scores, alerts) of 1,000 patients with only NEWS2 and with all
// three tables: the difference is the cost of the extra tables.
func BenchmarkEngineScoreTables(b *testing.B) {
	for _, tables := range [][]string{{"news2"}, {"news2", "mews", "qsofa"}} {
		b.Run(strings.Join(tables, "+"), func(b *testing.B) {
			cfg := config.Default()
			cfg.Detectors.Scores.Tables = tables
			e, err := newEngine(cfg, nil, catalog.Default(), memory.NewGoAllocator())
			if err != nil {
				b.Fatal(err)
			}
			const patients = 1000
			pts := make([]*patient, patients)
			for i := range pts {
				pts[i] = e.newPatient("t/p", "t", "p")
			}
			metrics := []string{"heart_rate", "spo2", "respiratory_rate", "body_temperature", "systolic_bp", "diastolic_bp", "mean_arterial_pressure", "consciousness"}
			base := []float64{80, 97, 16, 37, 120, 80, 93, 0}
			batch := &vigilv1.SampleBatch{Tenant: "t", Patient: "p", Samples: make([]*vigilv1.Sample, len(metrics))}
			for i := range batch.Samples {
				batch.Samples[i] = &vigilv1.Sample{Metric: metrics[i]}
			}
			out := outputs{batched: true}
			defer out.release()
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				p, step := i%patients, int64(i/patients)
				for j, s := range batch.Samples {
					// (As BenchmarkStreamEndToEnd: each patient's values
					// are constant, so most batches change no score.)
					s.Value, s.EventTimeMs = base[j]+float64((p+j)%5), t0+step*15000+int64(p)
				}
				e.apply(pts[p], batch, 0, &out)
				if out.finishDue() || i%256 == 255 {
					e.finish(&out)
					out.recycle()
				}
			}
			e.finish(&out)
			b.ReportMetric(float64(b.N*len(metrics))/b.Elapsed().Seconds(), "samples/s")
		})
	}
}
