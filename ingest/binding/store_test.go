package binding

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// startStore runs a Store on cfg until the test ends and waits until it has
// caught up.
func startStore(t testing.TB, cfg config.Config, reg *prometheus.Registry) *Store {
	t.Helper()
	deps := stage.Deps{}
	if reg != nil {
		deps.Metrics = reg
	}
	s, err := New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("binding store Run: %v", err)
		}
		if err := s.Close(context.Background()); err != nil {
			t.Errorf("close: %v", err)
		}
		if err := s.Close(context.Background()); err != nil {
			t.Errorf("second close: %v", err)
		}
	})
	rctx, rcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer rcancel()
	if err := s.Ready(rctx); err != nil {
		t.Fatal(err)
	}
	return s
}

func ms(s string) int64 {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		panic(err)
	}
	return t.UnixMilli()
}

// eventually polls cond for up to 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestBedKey(t *testing.T) {
	for _, tc := range []struct{ poc, room, bed, want string }{
		{"ICU1", "12", "A", "bed:ICU1/12/A"},
		{"ICU1", "", "7", "bed:ICU1/7"},
		{" ICU1 ", "", "", "bed:ICU1"},
		{"", "", "", ""},
	} {
		if got := BedKey(tc.poc, tc.room, tc.bed); got != tc.want {
			t.Errorf("BedKey(%q, %q, %q) = %q, want %q", tc.poc, tc.room, tc.bed, got, tc.want)
		}
	}
}

// TestInstancesShareBindings: two ingest instances on one topic see each
// other's writes; an instance started later reads them all back on start.
func TestInstancesShareBindings(t *testing.T) {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	a, b := startStore(t, cfg, nil), startStore(t, cfg, nil)
	ctx := context.Background()
	t0 := ms("2026-11-23T08:00:00Z")

	if err := a.Bind(ctx, Binding{Tenant: "st-mary", Device: "mon-1", Patient: "p-1", FromMs: t0, Source: SourceAPI, SetBy: "nurse-a"}); err != nil {
		t.Fatal(err)
	}
	// Read-your-writes: visible in a at once.
	if p, ok := a.Resolve("st-mary", "mon-1", t0+1000); !ok || p != "p-1" {
		t.Fatalf("a resolves mon-1 to %q %v right after its own write, want p-1", p, ok)
	}
	eventually(t, "b to see a's binding", func() bool { p, ok := b.Resolve("st-mary", "mon-1", t0+1000); return ok && p == "p-1" })

	if err := b.Bind(ctx, Binding{Tenant: "st-mary", Device: "mon-2", Patient: "p-2", FromMs: t0, Source: SourceADT}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a to see b's binding", func() bool { p, ok := a.Resolve("st-mary", "mon-2", t0); return ok && p == "p-2" })
	if _, ok := a.Resolve("other-tenant", "mon-2", t0); ok {
		t.Error("a binding of st-mary resolved for another tenant")
	}

	c := startStore(t, cfg, nil) // a restarted instance
	for dev, want := range map[string]string{"mon-1": "p-1", "mon-2": "p-2"} {
		if p, ok := c.Resolve("st-mary", dev, t0+5000); !ok || p != want {
			t.Errorf("new instance resolves %s to %q %v after Ready, want %s", dev, p, ok, want)
		}
	}
	if h := c.Get("st-mary", "mon-1"); len(h) != 1 || h[0].SetBy != "nurse-a" || h[0].Source != SourceAPI {
		t.Errorf("history of mon-1 on the new instance: %+v", h)
	}
}

// TestADTSequence plays admit, transfer (with and without the prior bed),
// re-use of a bed, update and discharge through ApplyADT and checks who each
// bed and device resolves to at every step, before and after, on this
// instance and on a restarted one; repeated events change nothing.
func TestADTSequence(t *testing.T) {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	reg := prometheus.NewRegistry()
	s := startStore(t, cfg, reg)
	ctx := context.Background()
	bed12, bed14, bed16 := BedKey("ICU1", "12", "A"), BedKey("ICU1", "14", ""), BedKey("ICU1", "16", "")
	var (
		admit     = ms("2026-11-23T08:00:00Z")
		transfer  = ms("2026-11-23T10:00:00Z")
		admit2    = ms("2026-11-23T11:00:00Z")
		transfer2 = ms("2026-11-23T13:00:00Z")
		disch     = ms("2026-11-23T15:00:00Z")
	)
	apply := func(ev ADTEvent) {
		t.Helper()
		ev.Tenant = "h"
		if err := s.ApplyADT(ctx, ev); err != nil {
			t.Fatalf("%s %s: %v", ev.Kind, ev.SetBy, err)
		}
	}
	// A01: p-1 admitted to bed 12; a monitor is bound to p-1 over the API.
	apply(ADTEvent{Kind: ADTAdmit, Patient: "p-1", Bed: bed12, AtMs: admit, SetBy: "GW ADT^A01 MSG1"})
	if err := s.Bind(ctx, Binding{Tenant: "h", Device: "mon-9", Patient: "p-1", FromMs: admit, Source: SourceAPI}); err != nil {
		t.Fatal(err)
	}
	// A02: p-1 moves from bed 12 (PV1-6) to bed 14.
	apply(ADTEvent{Kind: ADTTransfer, Patient: "p-1", Bed: bed14, PriorBed: bed12, AtMs: transfer, SetBy: "GW ADT^A02 MSG2"})
	// A01: p-2 admitted to bed 12.
	apply(ADTEvent{Kind: ADTAdmit, Patient: "p-2", Bed: bed12, AtMs: admit2, SetBy: "GW ADT^A01 MSG3"})
	// A02 without PV1-6: p-2 moves to bed 16, bed 12 is freed all the same.
	apply(ADTEvent{Kind: ADTTransfer, Patient: "p-2", Bed: bed16, AtMs: transfer2, SetBy: "GW ADT^A02 MSG4"})
	// A08 without a location, and one confirming bed 16: no change.
	apply(ADTEvent{Kind: ADTUpdate, Patient: "p-2", AtMs: transfer2 + 60_000, SetBy: "GW ADT^A08 MSG5"})
	apply(ADTEvent{Kind: ADTUpdate, Patient: "p-2", Bed: bed16, AtMs: transfer2 + 60_000, SetBy: "GW ADT^A08 MSG6"})
	// A03: p-1 discharged: bed 14 and the monitor end.
	apply(ADTEvent{Kind: ADTDischarge, Patient: "p-1", AtMs: disch, SetBy: "GW ADT^A03 MSG7"})
	applied := testutil.ToFloat64(s.m.applied)
	// The transfer and the discharge again (a resent message): no change.
	apply(ADTEvent{Kind: ADTTransfer, Patient: "p-1", Bed: bed14, PriorBed: bed12, AtMs: transfer, SetBy: "GW ADT^A02 MSG2"})
	apply(ADTEvent{Kind: ADTDischarge, Patient: "p-1", AtMs: disch, SetBy: "GW ADT^A03 MSG7"})

	check := func(who string, st *Store) {
		t.Helper()
		for _, tc := range []struct {
			dev  string
			at   int64
			want string // "" = unbound
		}{
			{bed12, admit - 1, ""},
			{bed12, admit, "p-1"},
			{bed12, transfer - 1, "p-1"},
			{bed12, transfer, ""},
			{bed12, admit2 - 1, ""},
			{bed12, admit2, "p-2"},
			{bed12, transfer2 - 1, "p-2"},
			{bed12, transfer2, ""},
			{bed14, transfer - 1, ""},
			{bed14, transfer, "p-1"},
			{bed14, disch - 1, "p-1"},
			{bed14, disch, ""},
			{bed16, transfer2, "p-2"},
			{bed16, disch + 86_400_000, "p-2"}, // p-2 still there
			{"mon-9", transfer + 1, "p-1"},     // a transfer keeps device bindings
			{"mon-9", disch - 1, "p-1"},
			{"mon-9", disch, ""}, // a discharge ends them
		} {
			got, ok := st.Resolve("h", tc.dev, tc.at)
			if got != tc.want || ok != (tc.want != "") {
				t.Errorf("%s: %s at %s: got %q %v, want %q", who, tc.dev, time.UnixMilli(tc.at).UTC().Format(time.TimeOnly), got, ok, tc.want)
			}
		}
	}
	check("live", s)
	if got := testutil.ToFloat64(s.m.applied); got != applied {
		t.Errorf("repeated transfer and discharge wrote %v records, want none", got-applied)
	}
	if got := testutil.ToFloat64(s.m.writes.WithLabelValues("adt_transfer", "noop")); got != 1 {
		t.Errorf(`vigil_binding_writes_total{op="adt_transfer",outcome="noop"} = %v, want 1`, got)
	}
	h := s.Get("h", bed14)
	if len(h) != 1 || h[0].ToMs != disch || h[0].EndSource != SourceADT || h[0].SetBy != "GW ADT^A02 MSG2" {
		t.Errorf("bed 14 history: %+v", h)
	}
	if h := s.Get("h", bed12); len(h) != 2 || h[0].EndSource != SourceADT || h[1].Patient != "p-2" || h[1].ToMs != transfer2 {
		t.Errorf("bed 12 history: %+v", h)
	}

	// Invalid events name the field and change nothing.
	err := s.ApplyADT(ctx, ADTEvent{Kind: ADTTransfer, Tenant: "h", Patient: "p-3", AtMs: disch})
	var inv *InvalidError
	if !errors.As(err, &inv) || !strings.Contains(err.Error(), "bed:") {
		t.Errorf("transfer without a bed: %v, want an InvalidError naming bed", err)
	}
	if err := s.ApplyADT(ctx, ADTEvent{Kind: "A99", Tenant: "h", Patient: "p-3"}); !errors.As(err, &inv) || !strings.Contains(err.Error(), "kind:") {
		t.Errorf("unknown kind: %v", err)
	}

	// The same history is what a restarted instance reads back from the
	// compacted topic.
	check("restarted", startStore(t, cfg, nil))
}

func TestHistoryIsBounded(t *testing.T) {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	reg := prometheus.NewRegistry()
	s := startStore(t, cfg, reg)
	t0 := ms("2026-11-23T00:00:00Z")
	n := MaxIntervals + 8
	for i := range n {
		if err := s.Bind(context.Background(), Binding{Tenant: "h", Device: "d", Patient: fmt.Sprintf("p-%d", i),
			FromMs: t0 + int64(i)*60_000, Source: SourceAPI}); err != nil {
			t.Fatal(err)
		}
	}
	h := s.Get("h", "d")
	if len(h) != MaxIntervals || h[0].Patient != "p-8" || h[len(h)-1].Patient != fmt.Sprintf("p-%d", n-1) {
		t.Fatalf("history: %d intervals from %s to %s, want %d from p-8", len(h), h[0].Patient, h[len(h)-1].Patient, MaxIntervals)
	}
	if got := testutil.ToFloat64(s.m.dropped); got != 8 {
		t.Errorf("vigil_binding_intervals_dropped_total = %v, want 8", got)
	}
	if _, ok := s.Resolve("h", "d", t0); ok {
		t.Error("a dropped interval still resolves")
	}
}

func TestBindRejectsInvalid(t *testing.T) {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	s := startStore(t, cfg, nil)
	err := s.Bind(context.Background(), Binding{Tenant: "a/b", Device: "d", Patient: "p", FromMs: 10, ToMs: 5})
	var inv *InvalidError
	if err == nil || !asInvalid(err, &inv) {
		t.Fatalf("got %v, want an InvalidError", err)
	}
	for _, f := range []string{"tenant", "to"} {
		if !contains(err.Error(), f+":") {
			t.Errorf("error %q does not name %s", err, f)
		}
	}
}

// TestBindIntervals checks the interval algebra on its own.
func TestBindIntervals(t *testing.T) {
	iv := func(p string, from, to int64) Interval { return Interval{Patient: p, FromMs: from, ToMs: to} }
	type span struct {
		p        string
		from, to int64
	}
	spans := func(ivs []Interval) []span {
		var out []span
		for _, x := range ivs {
			out = append(out, span{x.Patient, x.FromMs, x.ToMs})
		}
		return out
	}
	for _, tc := range []struct {
		name string
		cur  []Interval
		nw   Interval
		want []span
	}{
		{"open replaces open", []Interval{iv("a", 10, 0)}, iv("b", 20, 0), []span{{"a", 10, 20}, {"b", 20, 0}}},
		{"same start corrects", []Interval{iv("a", 10, 0)}, iv("b", 10, 0), []span{{"b", 10, 0}}},
		{"bounded override resumes", []Interval{iv("a", 10, 0)}, iv("b", 20, 30), []span{{"a", 10, 20}, {"b", 20, 30}, {"a", 30, 0}}},
		{"retro open stops at later", []Interval{iv("a", 50, 0)}, iv("b", 20, 0), []span{{"b", 20, 50}, {"a", 50, 0}}},
		{"bounded covers later", []Interval{iv("a", 10, 20), iv("c", 25, 0)}, iv("b", 15, 40), []span{{"a", 10, 15}, {"b", 15, 40}, {"c", 40, 0}}},
		{"gap kept", []Interval{iv("a", 10, 20)}, iv("b", 30, 0), []span{{"a", 10, 20}, {"b", 30, 0}}},
	} {
		got, changed := bind(tc.cur, tc.nw)
		if !changed || fmt.Sprint(spans(got)) != fmt.Sprint(tc.want) {
			t.Errorf("%s: got %v (changed %v), want %v", tc.name, spans(got), changed, tc.want)
		}
	}
	if _, changed := bind([]Interval{iv("a", 10, 0)}, iv("a", 20, 0)); changed {
		t.Error("re-binding the patient already bound (open) changed the history")
	}
}

func asInvalid(err error, target **InvalidError) bool { return errors.As(err, target) }

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// TestCheckReadiness: the readiness check fails, naming why, while the store
// has not caught up, and passes as soon as it has, without the caller
// polling: a probe that arrives while Run starts waits for the catch-up.
func TestCheckReadiness(t *testing.T) {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	// Some history for the second store to read.
	w := startStore(t, cfg, nil)
	for i := range 20 {
		if err := w.Bind(context.Background(), Binding{Tenant: "h", Device: fmt.Sprintf("d-%d", i), Patient: "p", FromMs: 1, Source: SourceAPI}); err != nil {
			t.Fatal(err)
		}
	}
	s, err := New(cfg, stage.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	start := time.Now()
	err = s.Check(context.Background())
	if err == nil || !strings.Contains(err.Error(), "still listing the end offsets of "+cfg.Kafka.Topics.Bindings) {
		t.Fatalf("Check before Run: %v", err)
	}
	if d := time.Since(start); d < 900*time.Millisecond || d > 3*time.Second {
		t.Errorf("Check before Run answered after %s, want about 1 s", d)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	probe := make(chan error, 1)
	go func() { probe <- s.Check(context.Background()) }()
	go func() { _ = s.Run(ctx) }()
	if err := <-probe; err != nil {
		t.Fatalf("Check while Run starts: %v", err)
	}
	if s.Len() != 20 {
		t.Errorf("ready with %d devices read, want 20", s.Len())
	}
}

// TestWriteErrorsClassified: an invalid write is permanent, a write to a
// closed store (a stopping process) may be retried elsewhere.
func TestWriteErrorsClassified(t *testing.T) {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	s := startStore(t, cfg, nil)
	err := s.ApplyADT(context.Background(), ADTEvent{Kind: ADTAdmit, Tenant: "h", Bed: "bed:1", AtMs: 1})
	if err == nil || IsRetriable(err) || !strings.Contains(err.Error(), "patient:") {
		t.Errorf("admit without a patient: %v (retriable %v), want a permanent error naming patient", err, IsRetriable(err))
	}
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	err = s.ApplyADT(context.Background(), ADTEvent{Kind: ADTAdmit, Tenant: "h", Patient: "p", Bed: "bed:1", AtMs: 1})
	if !errors.Is(err, ErrClosed) || !IsRetriable(err) {
		t.Errorf("admit on a closed store: %v (retriable %v), want retriable ErrClosed", err, IsRetriable(err))
	}
}

// BenchmarkResolve measures the look-up every sample without a patient
// makes (in parallel, as the ingest paths do), over 1,000 devices with 8
// intervals each, reporting lookups/s.
func BenchmarkResolve(b *testing.B) {
	cfg := testenv.Config(b, testenv.Kafka(b), "")
	s := startStore(b, cfg, nil)
	const devices, intervals = 1000, 8
	t0 := ms("2026-11-23T00:00:00Z")
	for d := range devices {
		ivs := make([]Interval, intervals)
		for i := range ivs {
			ivs[i] = Interval{Patient: fmt.Sprintf("p-%d-%d", d, i), FromMs: t0 + int64(i)*3600_000, ToMs: t0 + int64(i+1)*3600_000}
		}
		s.index[devKey{"h", fmt.Sprintf("dev-%d", d)}] = ivs // filled directly: the benchmark is the look-up
	}
	names := make([]string, devices)
	for d := range names {
		names[d] = fmt.Sprintf("dev-%d", d)
	}
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			at := t0 + int64(i%intervals)*3600_000 + 1800_000
			if _, ok := s.Resolve("h", names[i%devices], at); !ok {
				b.Error("miss")
				return
			}
			i++
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "lookups/s")
}
