package stream

import (
	"fmt"
	"math"
	"math/rand/v2"
	"regexp"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// baselineBatches is one patient's heart rate and SpO2, one batch a minute
// for the given minutes from t0 (a day and a half with the defaults the
// tests use): heart rate 70 +- 3 with a gentle circadian swing, SpO2 96-97,
// and from minute stepAt on a heart rate of 110.
func baselineBatches(patient string, minutes, stepAt int) []*vigilv1.SampleBatch {
	rng := rand.New(rand.NewPCG(11, 12))
	var out []*vigilv1.SampleBatch
	for m := range minutes {
		at := t0 + int64(m)*60_000 + 15_000
		hr := math.Round(70 + 4*math.Sin(2*math.Pi*float64(m)/1440) + 3*rng.NormFloat64())
		if m >= stepAt {
			hr = 110
		}
		out = append(out, &vigilv1.SampleBatch{SchemaVersion: 1, Tenant: "t", Patient: patient, Device: "d",
			Source: vigilv1.Source_SOURCE_SIMULATOR, IngestTimeMs: at + 50, MessageId: fmt.Sprint(m),
			Samples: []*vigilv1.Sample{
				{Metric: "heart_rate", Value: hr, EventTimeMs: at, Sequence: uint64(m)},
				{Metric: "spo2", Value: float64(96 + rng.IntN(2)), EventTimeMs: at, Sequence: uint64(m)},
			}})
	}
	return out
}

var sha256Hex = regexp.MustCompile(`^[0-9a-f]{64}$`)

// checkBaselineScores checks the baseline scores of 30 hours of stable
// heart rate followed by a step to 110/min: the first once the 12-hour
// warm-up is covered (band low), a high one at the step naming heart rate,
// and no score per window in between (the noise of single minutes does not
// flip the band).
func checkBaselineScores(t *testing.T, scores []*vigilv1.Score, stepAt int) {
	t.Helper()
	var bs []*vigilv1.Score
	for _, s := range scores {
		if s.GetKind() == KindBaseline {
			bs = append(bs, s)
		}
	}
	if len(bs) < 2 || len(bs) > 12 {
		t.Fatalf("%d baseline scores, want a few (on band changes only): %v", len(bs), bs)
	}
	first := bs[0]
	if first.GetBand() != "low" || first.GetEventTimeMs() < t0+12*3600_000 || first.GetEventTimeMs() > t0+13*3600_000 {
		t.Errorf("first baseline score: band %q at +%s, want low just after the 12h warm-up", first.GetBand(), time.Duration(first.GetEventTimeMs()-t0)*time.Millisecond)
	}
	var high *vigilv1.Score
	for _, s := range bs {
		if s.GetRuleset() != KindBaseline || s.GetRulesetVersion() != baselineVersion || !sha256Hex.MatchString(s.GetRulesetHash()) || s.GetId() == "" {
			t.Fatalf("score names ruleset %q version %q hash %q id %q", s.GetRuleset(), s.GetRulesetVersion(), s.GetRulesetHash(), s.GetId())
		}
		if s.GetBand() == "high" && high == nil {
			high = s
		}
	}
	// The scored value is the median of the newest 5 window means: the
	// third window of the step makes it 110.
	stepEnd := t0 + int64(stepAt+3)*60_000
	if high == nil || high.GetEventTimeMs() != stepEnd {
		t.Fatalf("no high baseline score at the step's third window end %d: %v", stepEnd, bs)
	}
	if high.GetValue() < 3 || len(high.GetTopContributors()) == 0 || high.GetTopContributors()[0] != "heart_rate" {
		t.Errorf("high score: value %v, top %v; want z >= 3 from heart_rate", high.GetValue(), high.GetTopContributors())
	}
	byMetric := map[string]*vigilv1.ScoreComponent{}
	for _, c := range high.GetComponents() {
		byMetric[c.GetMetric()] = c
	}
	hr, spo2 := byMetric["heart_rate"], byMetric["spo2"]
	if hr == nil || spo2 == nil || len(high.GetComponents()) != 2 {
		t.Fatalf("components %v, want heart_rate and spo2", high.GetComponents())
	}
	if hr.GetInputValue() != 110 || hr.GetInputUnit() != "/min" || hr.GetBand() != "high" || math.Abs(hr.GetBaselineMedian()-70) > 3 || hr.GetBaselineMad() <= 0 {
		t.Errorf("heart rate component %v: want 110 /min against a median near 70", hr)
	}
	wantZ := (110 - hr.GetBaselineMedian()) / (1.4826 * max(hr.GetBaselineMad(), 3))
	if math.Abs(hr.GetPoints()-wantZ) > 1e-9 || high.GetValue() != hr.GetPoints() {
		t.Errorf("heart rate z %v, score value %v; want (110 - median) / (1.4826 MAD) = %v", hr.GetPoints(), high.GetValue(), wantZ)
	}
	if spo2.GetBand() != "low" || math.Abs(spo2.GetBaselineMedian()-96.5) > 1 {
		t.Errorf("spo2 component %v", spo2)
	}
}

// TestEngineBaselineScores runs 31 hours of one patient through the
// engine, uninterrupted and with the state restored from its changelog
// encoding after every batch: both emit the same baseline scores, which
// checkBaselineScores checks.
func TestEngineBaselineScores(t *testing.T) {
	if testing.Short() {
		t.Skip("31 simulated hours; TestBaselineScoresOnKafka runs under -short")
	}
	const minutes, stepAt = 31 * 60, 30 * 60
	batches := baselineBatches("p-1", minutes, stepAt)
	a := runEngine(t, batches, false)
	checkBaselineScores(t, a.scores, stepAt)
	b := runEngine(t, batches, true)
	if len(a.scores) != len(b.scores) {
		t.Fatalf("%d scores uninterrupted, %d restored", len(a.scores), len(b.scores))
	}
	for i := range a.scores {
		if !proto.Equal(a.scores[i], b.scores[i]) {
			t.Fatalf("score %d differs after restores:\n%v\n%v", i, a.scores[i], b.scores[i])
		}
	}
}

// TestBaselineScoresOnKafka: a patient's samples over a day and a half,
// through the processor and a real (kfake) broker, give "baseline" scores
// on vigil.scores.v1 with their components and version.
func TestBaselineScoresOnKafka(t *testing.T) {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	const minutes, stepAt = 31 * 60, 30 * 60
	produce(t, cfg, baselineBatches("p-kafka", minutes, stepAt))
	r := start(t, cfg, "a")
	waitCaughtUp(t, cfg, 60*time.Second)
	r.stop(t)
	checkBaselineScores(t, readOutputs(t, cfg).scores, stepAt)
}
