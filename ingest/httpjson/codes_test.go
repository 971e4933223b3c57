package httpjson

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/mapping"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
)

// TestUnmappedCodesDeadLetteredCountedThenHotReloaded is item 5 end to end
// over HTTP: a LOINC code and a unit alias the tables lack are refused with
// reason unmapped_code, land on the dead-letter topic with the code, and
// are counted per code; an integrator then adds them to a file in the
// mapping folder and, without a restart, the same request is accepted.
func TestUnmappedCodesDeadLetteredCountedThenHotReloaded(t *testing.T) {
	brokerAddr := testenv.Kafka(t)
	cfg := testenv.Config(t, brokerAddr, "")
	dir := t.TempDir()
	reg := prometheus.NewRegistry()
	deps := stage.Deps{Log: testenv.Logger(t), Metrics: reg}
	store, err := mapping.NewStore(dir, 20*time.Millisecond, deps)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- store.Run(ctx) }()
	pub, err := publish.New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	h, err := New(cfg, deps, pub)
	if err != nil {
		t.Fatal(err)
	}
	h.SetCodes(store)
	srv := httptest.NewServer(h)
	t.Cleanup(func() {
		srv.Close()
		cancel()
		<-done
		_ = pub.Close(context.Background())
	})
	e := &env{url: srv.URL, broker: brokerAddr, cfg: cfg}

	now := time.Now().Add(-time.Second).UnixMilli()
	body := map[string]any{"tenant": "st-mary", "patient": "p-1", "device": "wearable-4", "samples": []map[string]any{
		{"loinc": "8328-7", "value": 36.9, "unit": "Cel", "time_ms": now},    // axillary temperature
		{"metric": "heart_rate", "value": 71, "unit": "bpm", "time_ms": now}, // an alias of the defaults
		{"metric": "heart_rate", "value": 72, "unit": "b/m", "time_ms": now}, // a vendor's own unit text
		{"loinc": "2708-6", "value": 0.96, "unit": "1", "time_ms": now},      // a LOINC code of the tables, not the catalogue
	}}
	resp, out := postJSON(t, e.url, body)
	p := problemOf(t, resp, out, http.StatusBadRequest)
	if p.Accepted != 2 || p.Rejected != 2 || len(p.Errors) != 2 {
		t.Fatalf("problem %s, want 2 accepted and 2 refused", out)
	}
	for i, want := range []struct{ field, code string }{{"samples[0].loinc", "8328-7"}, {"samples[2].unit", "b/m"}} {
		pe := p.Errors[i]
		if pe.Reason != "unmapped_code" || pe.Field != want.field || !strings.Contains(pe.Message, want.code) {
			t.Errorf("error %d: %+v, want unmapped_code on %s naming %q", i, pe, want.field, want.code)
		}
	}
	dls := deadLetters(t, e, 2)
	if dls[0].Reason != "unmapped_code" || dls[0].Field != "samples[0].loinc" || dls[0].Batch.GetSamples()[0].GetSourceCode() != "LOINC:8328-7" ||
		!strings.Contains(string(dls[0].Raw), `"8328-7"`) {
		t.Errorf("dead letter of the LOINC code: %v", dls[0])
	}
	if dls[1].Reason != "unmapped_code" || dls[1].Field != "samples[2].unit" || dls[1].Batch.GetSamples()[0].GetUnit() != "b/m" {
		t.Errorf("dead letter of the unit: %v", dls[1])
	}
	unmapped := func(system, code string) float64 {
		return labelledCounter(t, reg, "vigil_ingest_unmapped_codes_total", map[string]string{"source": "http", "system": system, "code": code})
	}
	if unmapped("LOINC", "8328-7") != 1 || unmapped("UCUM", "b/m") != 1 {
		t.Errorf("unmapped counts: LOINC 8328-7 %v, UCUM b/m %v; want 1 each", unmapped("LOINC", "8328-7"), unmapped("UCUM", "b/m"))
	}
	got := batches(t, e, 1)
	if n := len(got[0].Samples); n != 2 || got[0].Samples[0].Unit != "/min" || got[0].Samples[1].Metric != "spo2" ||
		got[0].Samples[1].Value != 96 || got[0].Samples[1].SourceCode != "LOINC:2708-6" {
		t.Fatalf("accepted samples %v", got[0].Samples)
	}

	// The integrator extends the tables; no restart.
	site := "version: 1\nmetrics:\n  - {system: LOINC, code: 8328-7, metric: body_temperature}\nunits:\n  - {system: UCUM, code: b/m, ucum: /min}\n"
	if err := os.WriteFile(filepath.Join(dir, "site.yaml"), []byte(site), 0o644); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok := store.Tables().Metric("LOINC", "8328-7"); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the mapping file was not picked up")
		}
		time.Sleep(10 * time.Millisecond)
	}
	resp, out = postJSON(t, e.url, body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("after the mapping file: %d %s", resp.StatusCode, out)
	}
	var acc Accepted
	if err := json.Unmarshal(out, &acc); err != nil || acc.Accepted != 4 {
		t.Fatalf("answer %s, want 4 accepted", out)
	}
	got = batches(t, e, 2)
	s := got[1].Samples
	if len(s) != 4 || s[0].Metric != "body_temperature" || s[0].SourceCode != "LOINC:8328-7" || s[0].Unit != "Cel" ||
		s[2].Metric != "heart_rate" || s[2].Unit != "/min" || s[2].Value != 72 {
		t.Fatalf("samples after the reload: %v", s)
	}
	if unmapped("LOINC", "8328-7") != 1 {
		t.Error("a mapped code was counted as unmapped")
	}
}

// labelledCounter reads the counter name{labels} from reg (0 when absent).
func labelledCounter(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) != len(labels) {
				continue
			}
			for _, l := range m.GetLabel() {
				if labels[l.GetName()] != l.GetValue() {
					continue metrics
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}
