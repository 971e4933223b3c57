package dedupe

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/internal/clock"
)

func TestSeenWithinWindow(t *testing.T) {
	clk := clock.NewManual(time.Unix(1_700_000_000, 0))
	f := New(time.Minute, 1000, clk)
	k := SampleKey(nil, "icu", "monitor-7", 42)
	if f.Seen(k) {
		t.Fatal("first sight reported as duplicate")
	}
	if !f.Seen(k) {
		t.Fatal("second sight not reported as duplicate")
	}
	if f.Seen(SampleKey(nil, "icu", "monitor-7", 43)) || f.Seen(SampleKey(nil, "icu", "monitor-8", 42)) || f.Seen(SampleKey(nil, "ward", "monitor-7", 42)) {
		t.Fatal("a different sequence, device or tenant was reported as duplicate")
	}
	clk.Advance(59 * time.Second)
	if !f.Seen(k) {
		t.Fatal("a duplicate inside the window was not caught")
	}
	clk.Advance(2 * time.Second)
	if f.Seen(k) {
		t.Fatal("a key older than the window was still a duplicate")
	}
	if !f.Seen(k) {
		t.Fatal("a key re-recorded after expiry was forgotten")
	}
}

func TestContainsThenAdd(t *testing.T) {
	f := New(time.Minute, 100, nil)
	k := MessageKey(nil, "mllp", "GATEWAY^ICU", "MSG00001")
	if f.Contains(k) {
		t.Fatal("Contains before Add")
	}
	if f.Contains(k) {
		t.Fatal("Contains recorded the key")
	}
	f.Add(k)
	if !f.Contains(k) || !f.Seen(k) {
		t.Fatal("an added key is not seen")
	}
	if string(MessageKey(nil, "mllp", "a", "b")) == string(SampleKey(nil, "mllp", "a", 0)) {
		t.Fatal("message and sample keys can collide")
	}
}

func TestBoundedEvictsOldest(t *testing.T) {
	clk := clock.NewManual(time.Unix(1_700_000_000, 0))
	f := New(time.Hour, 64, clk) // 4 per shard
	reg := prometheus.NewRegistry()
	if err := f.Register(reg, "test"); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10_000; i++ {
		clk.Advance(time.Millisecond)
		f.Seen(SampleKey(nil, "t", "d", uint64(i)))
	}
	if n := f.Len(); n > 64 {
		t.Fatalf("%d keys remembered, bound 64", n)
	}
	if f.Evicted() < 10_000-64 {
		t.Fatalf("evicted %d, want at least %d", f.Evicted(), 10_000-64)
	}
	if got := gathered(t, reg, "vigil_ingest_dedupe_evictions_total"); got != float64(f.Evicted()) {
		t.Fatalf("metric %v, counter %d", got, f.Evicted())
	}
	// The newest keys are still remembered; the oldest are gone.
	if !f.Seen(SampleKey(nil, "t", "d", 9999)) {
		t.Error("the newest key was evicted")
	}
	if f.Seen(SampleKey(nil, "t", "d", 0)) {
		t.Error("the oldest key survived a full filter")
	}
}

// TestFullFilterKeepsNewest: a full filter keeps at least the newest half
// of its bound, forgets the oldest keys first and counts what it forgot;
// keys older than the window go without being counted.
func TestFullFilterKeepsNewest(t *testing.T) {
	clk := clock.NewManual(time.Unix(1_700_000_000, 0))
	const max, n = 16 * 2048, 50_000
	f := New(time.Hour, max, clk)
	reg := prometheus.NewRegistry()
	if err := f.Register(reg, "test"); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		clk.Advance(time.Microsecond)
		if f.Seen(SampleKey(nil, "t", "d", uint64(i))) {
			t.Fatalf("key %d reported as duplicate on first sight", i)
		}
	}
	kept := f.Len()
	if kept < max/2 || kept > max || f.Evicted() != uint64(n-kept) {
		t.Fatalf("len %d evicted %d, want between %d and %d kept and the rest counted", kept, f.Evicted(), max/2, max)
	}
	// Each shard keeps at least its newest 1024 keys: the last 12000
	// (about 750 per shard) are all remembered; the first 10000 (with
	// about 2500 newer keys per shard after them) are all forgotten.
	for i := n - 12_000; i < n; i++ {
		if !f.Contains(SampleKey(nil, "t", "d", uint64(i))) {
			t.Fatalf("recent key %d forgotten", i)
		}
	}
	for i := 0; i < 10_000; i++ {
		if f.Contains(SampleKey(nil, "t", "d", uint64(i))) {
			t.Fatalf("old key %d still remembered in a full filter", i)
		}
	}
	// Past the window everything expires, uncounted.
	evicted := f.Evicted()
	clk.Advance(time.Hour)
	if f.Contains(SampleKey(nil, "t", "d", n-1)) {
		t.Fatal("a key older than the window is still remembered")
	}
	if got := gatheredGauge(t, reg, "vigil_ingest_dedupe_keys"); got != 0 {
		t.Fatalf("after the window: vigil_ingest_dedupe_keys = %v, want 0", got)
	}
	f.Add(SampleKey(nil, "t", "d", 1))
	if f.Len() != 1 || f.Evicted() != evicted {
		t.Fatalf("after the window: %d keys, %d evicted; want 1 and %d", f.Len(), f.Evicted(), evicted)
	}
}

func gatheredGauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func gathered(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func TestConcurrentExactlyOneFirst(t *testing.T) {
	f := New(time.Minute, 1<<16, nil)
	var firsts atomic.Int64
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				if !f.Seen(SampleKey(nil, "t", "d", uint64(i))) {
					firsts.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if firsts.Load() != 2000 {
		t.Fatalf("%d keys seen first, want 2000 (each exactly once)", firsts.Load())
	}
}

// BenchmarkSeen reports Seen calls per second on distinct keys (a full
// filter evicting), from all cores.
func BenchmarkSeen(b *testing.B) {
	f := New(10*time.Minute, 1<<20, nil)
	var n atomic.Uint64
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, 0, 64)
		dev := fmt.Sprint("dev-", n.Add(1<<40))
		var seq uint64
		for pb.Next() {
			seq++
			buf = SampleKey(buf[:0], "tenant", dev, seq)
			f.Seen(buf)
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "keys/s")
}

// TestSampleRefs: the sequence numbers of a device share an entry per
// block of 64, yet each is remembered on its own; batch calls answer per
// ref, in the order given.
func TestSampleRefs(t *testing.T) {
	clk := clock.NewManual(time.Unix(1_700_000_000, 0))
	f := New(time.Minute, 1<<16, clk)
	var buf []byte
	ref := func(device string, seq uint64) Ref {
		var r Ref
		r, buf = f.SampleRef(buf, "icu", device, seq)
		return r
	}
	var even, all []Ref
	for seq := uint64(1000); seq < 2000; seq++ {
		all = append(all, ref("gw-1", seq))
		if seq%2 == 0 {
			even = append(even, ref("gw-1", seq))
		}
	}
	f.AddRefs(even)
	f.AddRefs([]Ref{ref("gw-1", 1001)}) // a batch of one
	if n := f.Len(); n != 17 {
		t.Errorf("sequence numbers 1000-1999 take %d entries, want 17 (blocks 15 to 31 of 64)", n)
	}
	found := f.ContainsRefs(all, []bool{true})
	if len(found) != len(all)+1 || !found[0] {
		t.Fatalf("ContainsRefs did not append to found: len %d", len(found))
	}
	for i, ok := range found[1:] {
		seq := 1000 + i
		if want := seq%2 == 0 || seq == 1001; ok != want {
			t.Fatalf("sequence %d: found %v, want %v", seq, ok, want)
		}
	}
	for _, r := range []Ref{ref("gw-2", 1000), ref("gw-1", 1000+64*1000), ref("gw-1", 999)} {
		if f.ContainsRefs([]Ref{r}, nil)[0] {
			t.Errorf("ref %v of another device or block was found", r)
		}
	}
	// Message keys and sample blocks do not mix.
	if f.Contains(SampleKey(nil, "icu", "gw-1", 1000/64)) {
		t.Error("a sample key matched a block entry")
	}
	clk.Advance(time.Minute)
	for i, ok := range f.ContainsRefs(all, nil) {
		if ok {
			t.Fatalf("ref %d still found after the window", i)
		}
	}
	// A block re-used after its window starts empty.
	f.AddRefs([]Ref{ref("gw-1", 1002)})
	if f.ContainsRefs([]Ref{ref("gw-1", 1000)}, nil)[0] {
		t.Error("an expired sequence number came back with its block")
	}
}
