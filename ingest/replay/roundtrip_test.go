package replay

import (
	"context"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	"github.com/vigilhealth/vigil/simulator"
)

// canonical renders batches comparably: ingest time cleared and the source
// set to replay (HTTP in the live run), then sorted.
func canonical(t testing.TB, batches []*vigilv1.SampleBatch) []string {
	t.Helper()
	out := make([]string, 0, len(batches))
	for _, b := range batches {
		c := proto.Clone(b).(*vigilv1.SampleBatch)
		c.IngestTimeMs = 0
		c.Source = vigilv1.Source_SOURCE_REPLAY
		v, err := proto.MarshalOptions{Deterministic: true}.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, string(v))
	}
	slices.Sort(out)
	return out
}

// TestRecordingRoundTrip runs the simulator against a real HTTP ingest
// (socket, handler, publisher, broker A) while recording what it sends,
// then replays the gzip recording into a fresh broker B: B's sample
// batches equal A's (apart from source and ingest time).
func TestRecordingRoundTrip(t *testing.T) {
	addrA := testenv.Kafka(t)
	cfgA := testenv.Config(t, addrA, "")
	deps := stage.Deps{Log: testenv.Logger(t), Metrics: prometheus.NewRegistry()}
	pub, err := publish.New(cfgA, deps)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close(context.Background())
	h, err := httpjson.New(cfgA, deps, pub)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	defer srv.Close()

	sc := cfgA.Simulator
	sc.Target, sc.Beds, sc.Wearables, sc.Deteriorating = srv.URL, 2, 1, 1
	sc.PreRoll, sc.Duration = 2*time.Minute, 1500*time.Millisecond
	sim, err := simulator.New(sc, stage.Deps{Log: testenv.Logger(t), Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "ward.jsonl.gz")
	rec, err := CreateRecording(path)
	if err != nil {
		t.Fatal(err)
	}
	sim.RecordTo(rec)
	if err := sim.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := sim.RecordErr(); err != nil {
		t.Fatal(err)
	}
	if err := rec.Close(); err != nil {
		t.Fatal(err)
	}
	live := decodeBatches(t, addrA)
	var liveSamples int
	for _, b := range live {
		liveSamples += len(b.Samples)
	}
	if liveSamples < 500 {
		t.Fatalf("the simulator sent only %d samples", liveSamples)
	}

	addrB := testenv.Kafka(t)
	r := newReplayer(t, testenv.Config(t, addrB, ""), Options{})
	st, err := r.Run(context.Background(), []string{path})
	if err != nil {
		t.Fatal(err)
	}
	if st.Samples != int64(liveSamples) || st.Refused != 0 || st.Files != 1 {
		t.Errorf("replay stats %+v, live run accepted %d samples", st, liveSamples)
	}
	replayed := decodeBatches(t, addrB)
	for _, b := range replayed {
		if b.Source != vigilv1.Source_SOURCE_REPLAY {
			t.Fatalf("replayed batch source %v", b.Source)
		}
	}
	a, b := canonical(t, live), canonical(t, replayed)
	if !slices.Equal(a, b) {
		t.Errorf("replayed batches differ from the live run: %d vs %d batches", len(a), len(b))
	}
	// The recording is what curl would post: one JSON object per line.
	raw, _ := os.ReadFile(path)
	if len(raw) == 0 || strings.HasPrefix(string(raw), "{") {
		t.Errorf("recording %s is not gzip-compressed", path)
	}
}

// TestRecordingRefusals replays a plain .jsonl recording with a refused
// sample, an unknown field and a broken line: each becomes a dead letter,
// the good samples are published under their recorded message id.
func TestRecordingRefusals(t *testing.T) {
	now := time.Now().UnixMilli()
	lines := []string{
		`{"tenant":"t1","patient":"p1","device":"d1","message_id":"m1","samples":[{"metric":"heart_rate","value":70,"time_ms":` + itoa(now) + `,"seq":1},{"metric":"heart_rate","value":900,"time_ms":` + itoa(now) + `}]}`,
		`{"tenant":"t1","samples":[{"patient":"p2","device":"d2","loinc":"8310-5","value":98.6,"unit":"[degF]","time":"` + time.UnixMilli(now).UTC().Format(time.RFC3339Nano) + `","colour":"red"}]}`,
		`{"tenant":"t1","samples":[`,
		``,
		`{"tenant":"t1","patient":"p3","device":"d3","samples":[{"metric":"body_temperature","value":98.6,"unit":"[degF]","time_ms":` + itoa(now) + `}]}`,
	}
	path := filepath.Join(t.TempDir(), "rec.jsonl")
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := testenv.Kafka(t)
	cfg := testenv.Config(t, addr, "")
	st, err := newReplayer(t, cfg, Options{}).Run(context.Background(), []string{path})
	if err != nil {
		t.Fatal(err)
	}
	if st.Samples != 2 || st.Refused != 3 || st.Rows != 4 {
		t.Errorf("stats %+v", st)
	}
	got := map[string]string{}
	for _, b := range decodeBatches(t, addr) {
		for _, s := range b.Samples {
			got[b.Patient] = b.MessageId + " " + s.Metric + " " + strings.TrimRight(strings.TrimRight(ftoa(s.Value), "0"), ".")
		}
	}
	if got["p1"] != "m1 heart_rate 70" || got["p3"] != "replay-rec-5 body_temperature 37" || len(got) != 2 {
		t.Errorf("published %v", got)
	}
	reasons := map[string]int{}
	for _, rec := range testenv.ReadAll(t, addr, cfg.Kafka.Topics.DeadLetter) {
		var dl vigilv1.DeadLetter
		_ = proto.Unmarshal(rec.Value, &dl)
		reasons[dl.Reason]++
	}
	if reasons["out_of_range"] != 1 || reasons["unknown_field"] != 1 || reasons["invalid_json"] != 1 {
		t.Errorf("dead-letter reasons %v", reasons)
	}
}

func itoa(v int64) string   { return strconv.FormatInt(v, 10) }
func ftoa(v float64) string { return strconv.FormatFloat(v, 'f', 6, 64) }
