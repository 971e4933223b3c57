package runner

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"
)

type fakeStage struct {
	name   string
	mu     *sync.Mutex
	events *[]string
	fail   error
}

func (f fakeStage) record(ev string) {
	f.mu.Lock()
	*f.events = append(*f.events, ev)
	f.mu.Unlock()
}

func (f fakeStage) Run(ctx context.Context) error {
	f.record("start " + f.name)
	if f.fail != nil {
		return f.fail
	}
	<-ctx.Done()
	f.record("drained " + f.name)
	return nil
}

func (f fakeStage) Close(context.Context) error { f.record("close " + f.name); return nil }

func TestShutdownOrder(t *testing.T) {
	var mu sync.Mutex
	var events []string
	r := New(slog.New(slog.DiscardHandler), time.Second)
	for _, n := range []string{"ingest", "stream", "sink"} {
		r.AddStage(n, fakeStage{name: n, mu: &mu, events: &events})
	}
	r.AddResource("broker", func(context.Context) error {
		mu.Lock()
		events = append(events, "close broker")
		mu.Unlock()
		return nil
	})
	r.AddResource("clickhouse", func(context.Context) error {
		mu.Lock()
		events = append(events, "close clickhouse")
		mu.Unlock()
		return nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	if err := r.Run(ctx); err != nil {
		t.Fatal(err)
	}
	// Start order is not fixed between goroutines; the stop order is.
	var stops []string
	for _, e := range events {
		if len(e) > 6 && e[:6] != "start " {
			stops = append(stops, e)
		}
	}
	want := []string{"drained ingest", "close ingest", "drained stream", "close stream", "drained sink", "close sink", "close clickhouse", "close broker"}
	if len(stops) != len(want) {
		t.Fatalf("got %v, want %v", stops, want)
	}
	for i := range want {
		if stops[i] != want[i] {
			t.Fatalf("got %v, want %v", stops, want)
		}
	}
}

func TestStageFailureStopsAll(t *testing.T) {
	var mu sync.Mutex
	var events []string
	r := New(slog.New(slog.DiscardHandler), time.Second)
	boom := errors.New("boom")
	r.AddStage("ingest", fakeStage{name: "ingest", mu: &mu, events: &events})
	r.AddStage("stream", fakeStage{name: "stream", mu: &mu, events: &events, fail: boom})
	err := r.Run(context.Background())
	if !errors.Is(err, boom) {
		t.Fatalf("got %v, want boom", err)
	}
}
