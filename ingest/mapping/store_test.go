package mapping

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func newStore(t *testing.T, dir string, reload time.Duration, opts ...Option) (*Store, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	s, err := NewStore(dir, reload, stage.Deps{Log: testenv.Logger(t), Metrics: reg}, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return s, reg
}

// TestHotReload runs the Store as a stage and changes its folder under it:
// a new file is picked up, an invalid one is refused (counted, previous
// tables kept), and fixing it is picked up again.
func TestHotReload(t *testing.T) {
	dir := t.TempDir()
	s, _ := newStore(t, dir, 20*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		if err := s.Close(context.Background()); err != nil || s.Close(context.Background()) != nil {
			t.Error("Close is not idempotent")
		}
	}()
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	if _, ok := s.Tables().Metric("MDC", "150388"); ok {
		t.Fatal("skin temperature mapped before the file exists")
	}
	old := s.Tables()

	writeFile(t, dir, "site.yaml", "version: 1\nmetrics:\n  - {system: MDC, code: \"150388\", metric: body_temperature}\n")
	waitFor("the new file", func() bool { id, _ := s.Tables().Metric("MDC", "150388"); return id == "body_temperature" })
	if _, ok := old.Metric("MDC", "150388"); ok {
		t.Error("a reload changed a snapshot a caller holds")
	}
	if got := testutil.ToFloat64(s.reloads.WithLabelValues("ok")); got != 2 {
		t.Errorf("ok reloads = %v, want 2 (start and change)", got)
	}

	// A bad edit: the previous tables stay in force, the error is counted.
	writeFile(t, dir, "site.yaml", "version: 1\nmetrics:\n  - {system: MDC, code: \"150388\", metric: no_such_metric}\n")
	waitFor("the error to be counted", func() bool { return testutil.ToFloat64(s.reloads.WithLabelValues("error")) >= 1 })
	if id, _ := s.Tables().Metric("MDC", "150388"); id != "body_temperature" {
		t.Errorf("after a bad file: %q, want the previous mapping kept", id)
	}
	if _, err := s.Reload(); err == nil || !strings.Contains(err.Error(), "site.yaml:3") {
		t.Errorf("Reload: %v, want the error naming site.yaml:3", err)
	}

	writeFile(t, dir, "site.yaml", "version: 1\nmetrics:\n  - {system: MDC, code: \"150388\", metric: heart_rate}\n")
	waitFor("the fixed file", func() bool { id, _ := s.Tables().Metric("MDC", "150388"); return id == "heart_rate" })
	if changed, err := s.Reload(); changed || err != nil {
		t.Errorf("Reload of unchanged files: changed %v, err %v", changed, err)
	}
}

// TestRestartPicksUpFiles: a new Store (a restart) reads the folder; an
// invalid folder stops the start with the file and line.
func TestRestartPicksUpFiles(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "a.yaml", "version: 1\nunits:\n  - {system: UCUM, code: schläge/min, ucum: /min}\n")
	s, _ := newStore(t, dir, time.Second)
	if u, ok := s.Tables().Unit("UCUM", "schläge/min"); !ok || u != "/min" {
		t.Errorf("got %q, %v", u, ok)
	}
	writeFile(t, dir, "b.yaml", "version: 1\nunits:\n  - {system: UCUM, code: x, ucum: \"a b\"}\n")
	_, err := NewStore(dir, time.Second, stage.Deps{})
	if err == nil || !strings.Contains(err.Error(), "b.yaml:3") {
		t.Fatalf("got %v, want a start error naming b.yaml:3", err)
	}
}

func TestUnmappedCountsAndBoundsCardinality(t *testing.T) {
	s, reg := newStore(t, "", 0, WithMaxUnmappedCodes(3))
	s.Unmapped(vigilv1.Source_SOURCE_MLLP, "MDC", "999999")
	s.Unmapped(vigilv1.Source_SOURCE_MLLP, "urn:iso:std:iso:11073:10101", "999999") // same pair, alias system
	s.Unmapped(vigilv1.Source_SOURCE_FHIR, "http://loinc.org", "1554-5")
	s.Unmapped(vigilv1.Source_SOURCE_MLLP, "99VENDOR", strings.Repeat("x", 200))
	for i := 0; i < 50; i++ {
		s.Unmapped(vigilv1.Source_SOURCE_HTTP, "MDC", fmt.Sprint(100000+i))
	}
	s.Unmapped(vigilv1.Source_SOURCE_MLLP, "MDC", "999999") // known pair still counted under its code
	c := s.unmappedTotal
	if got := testutil.ToFloat64(c.WithLabelValues("mllp", "MDC", "999999")); got != 3 {
		t.Errorf("MDC 999999 counted %v, want 3", got)
	}
	if got := testutil.ToFloat64(c.WithLabelValues("fhir", "LOINC", "1554-5")); got != 1 {
		t.Errorf("LOINC 1554-5 counted %v, want 1", got)
	}
	if got := testutil.ToFloat64(c.WithLabelValues("mllp", "99VENDOR", strings.Repeat("x", 64))); got != 1 {
		t.Errorf("long code not clipped to 64 bytes: %v", got)
	}
	if got := testutil.ToFloat64(c.WithLabelValues("http", "MDC", "other")); got != 50 {
		t.Errorf("codes over the bound counted %v under other, want 50", got)
	}
	n, err := testutil.GatherAndCount(reg, "vigil_ingest_unmapped_codes_total")
	if err != nil {
		t.Fatal(err)
	}
	if n != 4 {
		t.Errorf("%d label sets, want 4 (3 distinct codes + other)", n)
	}
}

func TestNewStoreRegistersOnce(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := NewStore("", 0, stage.Deps{Metrics: reg}); err != nil {
		t.Fatal(err)
	}
	if _, err := NewStore("", 0, stage.Deps{Metrics: reg}); err == nil {
		t.Error("a second Store on the same registry registered its metrics twice")
	}
}
