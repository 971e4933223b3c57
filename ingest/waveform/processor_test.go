package waveform

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vigilhealth/vigil/features/ecg"
	"github.com/vigilhealth/vigil/ingest/wfdb"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// recorder is a Publisher that keeps what it was given, and fails while
// fail is set (standing in for a Kafka outage in the rollback test).
type recorder struct {
	mu      sync.Mutex
	batches []*vigilv1.SampleBatch
	fail    bool
}

func (r *recorder) Publish(_ context.Context, b []*vigilv1.SampleBatch) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail {
		return errors.New("kafka unavailable")
	}
	r.batches = append(r.batches, b...)
	return nil
}

func (r *recorder) samples() []*vigilv1.Sample {
	var out []*vigilv1.Sample
	for _, b := range r.batches {
		out = append(out, b.Samples...)
	}
	return out
}

type rec100 struct {
	fs    float64
	mlii  []float64
	beats []int64
}

func load100(t testing.TB) rec100 {
	t.Helper()
	dir := testenv.Dataset(t, "mitbih-100")
	rec, err := wfdb.Open(dir, "100")
	if err != nil {
		t.Fatal(err)
	}
	sig, err := rec.ReadPhysical()
	if err != nil {
		t.Fatal(err)
	}
	anns, err := wfdb.ReadAnnotations(dir, "100", "atr", 0)
	if err != nil {
		t.Fatal(err)
	}
	r := rec100{fs: rec.Header.FreqHz, mlii: sig[0]}
	for _, a := range anns {
		if a.Type.IsBeat() {
			r.beats = append(r.beats, a.Sample)
		}
	}
	return r
}

const t0 = int64(1_790_000_000_000)

func newProc(t testing.TB, pub Publisher, maxCh int) (*Processor, *prometheus.Registry) {
	reg := prometheus.NewRegistry()
	p, err := NewProcessor(pub, Options{MaxChannels: maxCh, MaxChunkSamples: 1 << 16}, stage.Deps{Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	return p, reg
}

func chunk(dev string, start int64, v []float64) *Chunk {
	return &Chunk{Tenant: "t1", Patient: "p1", Device: dev, Channel: "MLII", Metric: "ecg", Unit: "mV", RateHz: 360,
		StartMs: start, Values: slices.Clone(v), Source: vigilv1.Source_SOURCE_HTTP, MessageID: "m"}
}

// feed sends x in chunks of n samples with exact start times.
func feed(t *testing.T, p *Processor, dev string, x []float64, n int) {
	t.Helper()
	for off := 0; off < len(x); off += n {
		end := min(off+n, len(x))
		if _, err := p.Process(context.Background(), chunk(dev, t0+int64(off)*1000/360, x[off:end])); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRRMatchesDetector checks the published samples against the detector
// run directly: same intervals, event time of the second peak, fields.
func TestRRMatchesDetector(t *testing.T) {
	r := load100(t)
	x := r.mlii[:360*120]
	var pub recorder
	p, reg := newProc(t, &pub, 10)
	feed(t, p, "bed-1", x, 3600)

	d, _ := ecg.New(360)
	peaks := d.Process(nil, x)
	rr := ecg.RRIntervalsMs(nil, peaks, 360)
	got := pub.samples()
	if len(got) != len(rr) {
		t.Fatalf("%d rr samples, detector gives %d intervals", len(got), len(rr))
	}
	for k, s := range got {
		want := peaks[k+1]
		if s.Value != rr[k] || s.EventTimeMs != t0+int64(float64(want.Index)*1000/360+0.5) || s.Sequence != uint64(k+1) ||
			s.Metric != RRMetric || s.Unit != "ms" || s.Quality != uint32(vigilv1.QualityFlag_QUALITY_DERIVED) ||
			s.SourceCode != RRSourceCode || s.Channel != "MLII" {
			t.Fatalf("sample %d = %v, want value %v at peak %d", k, s, rr[k], want.Index)
		}
	}
	if n := testutil.ToFloat64(p.discontinuity); n != 0 {
		t.Errorf("%v discontinuities on a continuous feed", n)
	}
	_ = reg
}

// TestChunkingDoesNotChangeRR feeds the same signal in 1 s, 2.5 s and 10 s
// chunks on three devices: identical RR samples.
func TestChunkingDoesNotChangeRR(t *testing.T) {
	r := load100(t)
	x := r.mlii[:360*60]
	var want []*vigilv1.Sample
	for i, n := range []int{360, 900, 3600} {
		var pub recorder
		p, _ := newProc(t, &pub, 10)
		feed(t, p, "bed", x, n)
		got := pub.samples()
		if i == 0 {
			want = got
			continue
		}
		if len(got) != len(want) {
			t.Fatalf("chunks of %d: %d samples, want %d", n, len(got), len(want))
		}
		for k := range got {
			if got[k].Value != want[k].Value || got[k].EventTimeMs != want[k].EventTimeMs || got[k].Sequence != want[k].Sequence {
				t.Fatalf("chunks of %d: sample %d differs", n, k)
			}
		}
	}
}

// TestGapResets sends 30 s, skips 5 s, sends 30 s: the second part must
// start a new stream (no RR interval across the gap) and be counted.
func TestGapResets(t *testing.T) {
	r := load100(t)
	var pub recorder
	p, _ := newProc(t, &pub, 10)
	a := r.mlii[:360*30]
	b := r.mlii[360*35 : 360*65]
	res1, err := p.Process(context.Background(), chunk("bed", t0, a))
	if err != nil || !res1.Reset {
		t.Fatalf("first chunk: %+v %v (want a fresh stream)", res1, err)
	}
	res2, err := p.Process(context.Background(), chunk("bed", t0+35_000, b))
	if err != nil || !res2.Reset {
		t.Fatalf("after the gap: %+v %v (want a reset)", res2, err)
	}
	if n := testutil.ToFloat64(p.discontinuity); n != 1 {
		t.Errorf("discontinuities %v, want 1", n)
	}
	for _, s := range pub.samples() {
		if s.Value > 1500 {
			t.Errorf("RR %v ms at %d spans the gap", s.Value, s.EventTimeMs-t0)
		}
	}
	// An overlapping chunk (start earlier than expected) resets too, and a
	// rate change.
	if res, _ := p.Process(context.Background(), chunk("bed", t0+60_000, b[:3600])); !res.Reset {
		t.Error("overlapping chunk did not reset")
	}
	c := chunk("bed", t0+70_000, b[:3600])
	c.RateHz = 250
	if res, _ := p.Process(context.Background(), c); !res.Reset {
		t.Error("rate change did not reset")
	}
	if n := testutil.ToFloat64(p.discontinuity); n != 3 {
		t.Errorf("discontinuities %v, want 3", n)
	}
}

// TestEvictionBounded keeps 2 channels at most: a third evicts the least
// recently used, counted, and that channel then starts afresh.
func TestEvictionBounded(t *testing.T) {
	r := load100(t)
	var pub recorder
	p, _ := newProc(t, &pub, 2)
	x := r.mlii[:3600]
	for _, dev := range []string{"a", "b", "c"} {
		if _, err := p.Process(context.Background(), chunk(dev, t0, x)); err != nil {
			t.Fatal(err)
		}
	}
	if n := testutil.ToFloat64(p.evictions); n != 1 {
		t.Errorf("evictions %v, want 1", n)
	}
	if n := testutil.ToFloat64(p.channels); n != 2 {
		t.Errorf("channels %v, want 2", n)
	}
	res, err := p.Process(context.Background(), chunk("a", t0+10_000, r.mlii[3600:7200]))
	if err != nil || !res.Reset {
		t.Errorf("evicted channel a: %+v %v, want a fresh stream", res, err)
	}
	res, err = p.Process(context.Background(), chunk("c", t0+10_000, r.mlii[3600:7200]))
	if err != nil || res.Reset {
		t.Errorf("kept channel c: %+v %v, want it continued", res, err)
	}
}

// TestFailedPublishRollsBack fails the publish of one chunk, retries it,
// and requires the same RR samples as a run without the failure.
func TestFailedPublishRollsBack(t *testing.T) {
	r := load100(t)
	x := r.mlii[:360*60]
	var clean recorder
	p1, _ := newProc(t, &clean, 10)
	feed(t, p1, "bed", x, 3600)

	var flaky recorder
	p2, _ := newProc(t, &flaky, 10)
	for off, k := 0, 0; off < len(x); off, k = off+3600, k+1 {
		c := func() *Chunk { return chunk("bed", t0+int64(off)*1000/360, x[off:off+3600]) }
		if k == 3 {
			flaky.fail = true
			if _, err := p2.Process(context.Background(), c()); err == nil {
				t.Fatal("publish failure not reported")
			}
			flaky.fail = false
		}
		if _, err := p2.Process(context.Background(), c()); err != nil {
			t.Fatal(err)
		}
	}
	a, b := clean.samples(), flaky.samples()
	if len(a) != len(b) {
		t.Fatalf("with a failed publish: %d samples, without: %d", len(b), len(a))
	}
	for k := range a {
		if a[k].Value != b[k].Value || a[k].EventTimeMs != b[k].EventTimeMs || a[k].Sequence != b[k].Sequence {
			t.Fatalf("sample %d differs after the retry", k)
		}
	}
	if n := testutil.ToFloat64(p2.discontinuity); n != 0 {
		t.Errorf("the retry counted %v discontinuities", n)
	}
}

func TestRefusesChunks(t *testing.T) {
	var pub recorder
	p, _ := newProc(t, &pub, 10)
	cases := []struct {
		field string
		mod   func(*Chunk)
	}{
		{"rate_hz", func(c *Chunk) { c.RateHz = 20 }},
		{"unit", func(c *Chunk) { c.Unit = "mm[Hg]" }},
		{"metric", func(c *Chunk) { c.Metric = "pleth" }},
		{"values", func(c *Chunk) { c.Values = nil }},
		{"tenant", func(c *Chunk) { c.Tenant = "" }},
		{"device", func(c *Chunk) { c.Device = "bad\ndevice" }},
	}
	for _, tc := range cases {
		c := chunk("bed", t0, make([]float64, 100))
		tc.mod(c)
		_, err := p.Process(context.Background(), c)
		var ce *ChunkError
		if !errors.As(err, &ce) || ce.Field != tc.field {
			t.Errorf("%s: err %v, want a ChunkError on %s", tc.field, err, tc.field)
		}
	}
}

func TestConcurrentChannels(t *testing.T) {
	r := load100(t)
	var pub recorder
	p, _ := newProc(t, &pub, 4)
	var wg sync.WaitGroup
	for _, dev := range []string{"a", "b", "c", "d", "e", "f"} {
		wg.Go(func() {
			x := r.mlii[:360*20]
			for off := 0; off < len(x); off += 720 {
				_, _ = p.Process(context.Background(), chunk(dev, t0+int64(off)*1000/360, x[off:off+720]))
			}
		})
	}
	wg.Wait()
	if len(pub.samples()) == 0 {
		t.Fatal("no samples")
	}
}

// TestOneRRChannelPerDevice sends two leads of one device: only the first
// lead's RR intervals are published (the second is accepted, counted, not
// analysed); after the first lead has been silent for more than
// TakeoverMs, the second takes over.
func TestOneRRChannelPerDevice(t *testing.T) {
	r := load100(t)
	x := r.mlii[:360*60]
	var pub recorder
	p, reg := newProc(t, &pub, 10)
	lead := func(name string, start int64, v []float64) *Chunk {
		c := chunk("bed-1", start, v)
		c.Channel = name
		return c
	}
	for off := 0; off < len(x); off += 3600 {
		for _, name := range []string{"MLII", "V5"} {
			res, err := p.Process(context.Background(), lead(name, t0+int64(off)*1000/360, x[off:off+3600]))
			if err != nil {
				t.Fatal(err)
			}
			if res.Secondary != (name == "V5") || res.Samples != 3600 {
				t.Fatalf("%s at %d: %+v", name, off, res)
			}
		}
	}
	channels := map[string]int{}
	for _, s := range pub.samples() {
		channels[s.Channel]++
	}
	if channels["MLII"] < 60 || channels["V5"] != 0 {
		t.Fatalf("rr samples per channel %v: want MLII only", channels)
	}
	if got := testutil.ToFloat64(p.secondary); got != float64(len(x)) {
		t.Errorf("secondary samples %v, want %d", got, len(x))
	}
	// MLII stops; V5 goes on. Within TakeoverMs V5 stays secondary, then
	// takes over and its intervals are published.
	end := t0 + int64(len(x))*1000/360
	res, err := p.Process(context.Background(), lead("V5", end+TakeoverMs-1000, x[:3600]))
	if err != nil || !res.Secondary {
		t.Fatalf("V5 inside the takeover time: %+v %v", res, err)
	}
	var rr int
	for k := 0; k < 6; k++ {
		res, err := p.Process(context.Background(), lead("V5", end+TakeoverMs+1+int64(k)*10_000, x[k*3600:(k+1)*3600]))
		if err != nil || res.Secondary {
			t.Fatalf("V5 after the takeover time: %+v %v", res, err)
		}
		rr += res.RRIntervals
	}
	if rr < 40 {
		t.Errorf("V5 published %d rr intervals after taking over", rr)
	}
	_ = reg
}
