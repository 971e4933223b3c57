package stream

import (
	"os"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/apache/arrow/go/v17/arrow/memory"

	"github.com/vigilhealth/vigil/detectors/ews"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/config"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// TestEngineAlertCommandsTimersAndLocation: through the engine, a raised
// alert names the patient's bed and ward; the escalation timer fires on
// processing time; an acknowledgement command (a batch without samples)
// emits ACKNOWLEDGED and stops the escalation; the state, location
// included, survives the changelog; a feature rule fires on the window's
// minimum at the window end.
func TestEngineAlertCommandsTimersAndLocation(t *testing.T) {
	rules := t.TempDir() + "/rules.yaml"
	writeRules(t, rules, `
name: engine-test
version: "1"
rules:
  - {name: agg, score: news2, raise: 5, escalate_after: 1m, max_tier: 3, suppress_after_ack: 5m}
  - {name: low_spo2, feature: "spo2:min", direction: below, raise: 88, clear: 90}
`)
	cfg := config.Default()
	cfg.Alerts.Lifecycle.Rules = rules
	mem := memory.NewCheckedAllocator(memory.NewGoAllocator())
	defer mem.AssertSize(t, 0)
	e, err := newEngine(cfg, ews.Default(), catalog.Default(), mem)
	if err != nil {
		t.Fatal(err)
	}
	var out outputs
	defer out.release()
	p := e.newPatient("st-mary/p-9", "st-mary", "p-9")
	t0 := time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC).UnixMilli()
	now := t0 + 500
	batch := func(at int64, kv ...any) *vigilv1.SampleBatch {
		b := &vigilv1.SampleBatch{SchemaVersion: 1, Tenant: "st-mary", Patient: "p-9", Device: "mon", IngestTimeMs: now, Location: "ICU1^07^A"}
		for i := 0; i < len(kv); i += 2 {
			b.Samples = append(b.Samples, &vigilv1.Sample{Metric: kv[i].(string), Value: kv[i+1].(float64), EventTimeMs: at + int64(i)})
		}
		return b
	}
	alertsOf := func() []*vigilv1.AlertEvent {
		var evs []*vigilv1.AlertEvent
		for _, o := range out.list {
			if o.kind == outAlert {
				evs = append(evs, o.alert)
			}
		}
		return evs
	}
	out.reset()
	e.apply(p, batch(t0, "respiratory_rate", 23.0, "spo2", 87.0, "systolic_bp", 98.0, "heart_rate", 131.0, "consciousness", 0.0, "body_temperature", 38.5), now, &out)
	evs := alertsOf()
	if len(evs) != 1 || evs[0].Type != vigilv1.AlertEventType_ALERT_EVENT_RAISED || evs[0].Location != "ICU1^07^A" || evs[0].Ward != "ICU1" ||
		evs[0].RulesName != "engine-test" || evs[0].EscalateAfterMs != 60000 {
		t.Fatalf("raise: %v", evs)
	}
	id := evs[0].AlertId

	// Through the changelog.
	raw, err := encode(p.toProto())
	if err != nil {
		t.Fatal(err)
	}
	var ps vigilv1.PatientState
	if err := proto.Unmarshal(raw, &ps); err != nil {
		t.Fatal(err)
	}
	if p, err = e.fromProto(p.key, &ps); err != nil {
		t.Fatal(err)
	}
	if p.location != "ICU1^07^A" || len(p.alerts.Tracks) != 1 || p.alerts.Tracks[0].AlertID != id {
		t.Fatalf("restored location %q tracks %+v", p.location, p.alerts.Tracks)
	}

	out.reset()
	if alertsDue(p, now+59999) || !alertsDue(p, now+60000) {
		t.Fatal("escalation not due exactly at escalate_after")
	}
	if !e.alertTimers(p, now+60000, &out) {
		t.Fatal("timer changed nothing")
	}
	if evs := alertsOf(); len(evs) != 1 || evs[0].Type != vigilv1.AlertEventType_ALERT_EVENT_ESCALATED || evs[0].Tier != 1 || evs[0].Ward != "ICU1" {
		t.Fatalf("escalation: %v", evs)
	}

	out.reset()
	cmd := &vigilv1.SampleBatch{SchemaVersion: 1, Tenant: "st-mary", Patient: "p-9", IngestTimeMs: now + 61000,
		AlertCommand: &vigilv1.AlertCommand{AlertId: id, User: "dr.o", Note: "seen", TimeMs: now + 61000, CommandId: "c1"}}
	if !e.apply(p, cmd, now+61000, &out) {
		t.Fatal("acknowledgement changed nothing")
	}
	if evs := alertsOf(); len(evs) != 1 || evs[0].Type != vigilv1.AlertEventType_ALERT_EVENT_ACKNOWLEDGED || evs[0].Actor != "dr.o" || evs[0].CommandId != "c1" {
		t.Fatalf("ack: %v", evs)
	}
	out.reset()
	if e.apply(p, cmd, now+62000, &out) || len(out.list) != 0 {
		t.Fatalf("a repeated acknowledgement changed the patient: %v", out.list)
	}
	if alertsDue(p, now+10*60000) {
		t.Error("escalation still due after the acknowledgement")
	}

	// The next batch closes the first minute: the window's SpO2 minimum
	// (87) is below 88: the feature rule fires at the window end.
	out.reset()
	e.apply(p, batch(t0+70000, "heart_rate", 130.0), now+70000, &out)
	var feat *vigilv1.AlertEvent
	for _, ev := range alertsOf() {
		if ev.Rule == "low_spo2" {
			feat = ev
		}
	}
	if feat == nil || feat.Type != vigilv1.AlertEventType_ALERT_EVENT_RAISED || feat.Value != 87 || feat.Source != "feature:spo2:min" ||
		feat.EventTimeMs != t0+60000 || feat.Score.GetComponents()[0].GetInputTimeMs() != t0+2 {
		t.Fatalf("feature alert: %v", feat)
	}
}

func writeRules(t *testing.T, path, doc string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
}
