package alerting

import (
	"strconv"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/detectors/ews"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

const t0 = int64(1_800_000_000_000)

var ruleset = ews.Default()

// score computes a real NEWS2 score for the vitals at event time at.
func score(at int64, v map[string]float64) *vigilv1.Score {
	return ruleset.Score(ews.Request{
		Tenant: "st-mary", Patient: "p-1", AtMs: at, Staleness: time.Hour,
		Latest: func(m string) (ews.Observation, bool) {
			x, ok := v[m]
			return ews.Observation{Value: x, TimeMs: at}, ok
		},
	})
}

var (
	well   = map[string]float64{"respiratory_rate": 16, "spo2": 97, "systolic_bp": 120, "heart_rate": 70, "consciousness": 0, "body_temperature": 37}
	four   = map[string]float64{"respiratory_rate": 21, "spo2": 97, "systolic_bp": 120, "heart_rate": 111, "consciousness": 0, "body_temperature": 37}
	ten    = map[string]float64{"respiratory_rate": 23, "spo2": 93, "systolic_bp": 98, "heart_rate": 131, "consciousness": 0, "body_temperature": 38.5}
	six    = map[string]float64{"respiratory_rate": 24, "spo2": 96, "systolic_bp": 150, "heart_rate": 112, "consciousness": 0, "body_temperature": 39.1}
	redSat = map[string]float64{"respiratory_rate": 16, "spo2": 91, "systolic_bp": 120, "heart_rate": 70, "consciousness": 0, "body_temperature": 37}
)

type ev struct {
	typ      vigilv1.AlertEventType
	rule     string
	severity string
}

func kinds(evs []*vigilv1.AlertEvent) []ev {
	var out []ev
	for _, e := range evs {
		out = append(out, ev{e.Type, e.Rule, e.Severity})
	}
	return out
}

func equal(a, b []ev) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

const (
	raised   = vigilv1.AlertEventType_ALERT_EVENT_RAISED
	resolved = vigilv1.AlertEventType_ALERT_EVENT_RESOLVED
)

func TestLifecycle(t *testing.T) {
	e := New(NEWS2Rules())
	var st State
	tr := Trigger{IngestTimeMs: 5, EmittedTimeMs: 9}
	steps := []struct {
		name string
		at   int64
		v    map[string]float64
		want []ev
	}{
		{"aggregate 4, no red: nothing", t0, four, nil},
		{"aggregate 10: raised high", t0 + 1000, ten, []ev{{raised, RuleNEWS2Aggregate, "high"}}},
		{"aggregate 6: stays raised, not repeated", t0 + 2000, six, nil},
		{"aggregate 10 again: not repeated", t0 + 3000, ten, nil},
		{"an older well score: ignored", t0 + 500, well, nil},
		{"single red at 3: aggregate resolved, single raised", t0 + 4000, redSat,
			[]ev{{raised, RuleNEWS2SingleRed, "medium"}, {resolved, RuleNEWS2Aggregate, "high"}}},
		{"well: single resolved", t0 + 5000, well, []ev{{resolved, RuleNEWS2SingleRed, "medium"}}},
		{"well again: nothing", t0 + 6000, well, nil},
		{"aggregate 6: raised medium", t0 + 7000, six, []ev{{raised, RuleNEWS2Aggregate, "medium"}}},
	}
	var aggID string
	for _, s := range steps {
		sc := score(s.at, s.v)
		got := e.Evaluate(&st, sc, tr)
		if !equal(kinds(got), s.want) {
			t.Fatalf("%s: events %v, want %v", s.name, kinds(got), s.want)
		}
		for _, g := range got {
			if g.Score != sc || g.EventTimeMs != s.at || g.TriggerIngestTimeMs != 5 || g.EmittedTimeMs != 9 ||
				g.RulesetHash != ruleset.Hash || g.RulesetVersion != ruleset.Version || g.Tenant != "st-mary" || g.Patient != "p-1" {
				t.Errorf("%s: event fields %v", s.name, g)
			}
			if g.Reason == "" || g.EventId == "" || g.AlertId == "" {
				t.Errorf("%s: empty reason or ids: %v", s.name, g)
			}
			if g.Rule == RuleNEWS2Aggregate {
				if g.Type == raised {
					aggID = g.AlertId
				} else if g.AlertId != aggID {
					t.Errorf("%s: resolved alert id %s, raised %s", s.name, g.AlertId, aggID)
				}
			}
		}
	}
	if len(st.Open) != 1 || st.Open[0].Rule != RuleNEWS2Aggregate || st.LastEvalMs != t0+7000 {
		t.Errorf("final state %+v", st)
	}
}

func TestDeterministicIDs(t *testing.T) {
	run := func() []*vigilv1.AlertEvent {
		e := New(NEWS2Rules())
		var st State
		out := e.Evaluate(&st, score(t0, ten), Trigger{EmittedTimeMs: 1})
		return append(out, e.Evaluate(&st, score(t0+60000, well), Trigger{EmittedTimeMs: 2})...)
	}
	a, b := run(), run()
	if len(a) != 2 || len(b) != 2 {
		t.Fatalf("events %d %d", len(a), len(b))
	}
	for i := range a {
		if a[i].EventId != b[i].EventId || a[i].AlertId != b[i].AlertId {
			t.Errorf("event %d ids differ between runs", i)
		}
	}
	if a[0].EventId == a[1].EventId {
		t.Error("raise and resolve share an event id")
	}
	want := ews.HashID("alert", "st-mary", "p-1", RuleNEWS2Aggregate, strconv.FormatInt(t0, 10))
	if a[0].AlertId != want {
		t.Errorf("alert id %s, want hash of tenant, patient, rule, raise time %s", a[0].AlertId, want)
	}
}

// TestStateSurvivesProto: an alert raised before a restore is resolved
// (with its id) after it, and not raised again.
func TestStateSurvivesProto(t *testing.T) {
	e := New(NEWS2Rules())
	var st State
	first := e.Evaluate(&st, score(t0, ten), Trigger{})
	var ps vigilv1.PatientState
	st.ToProto(&ps)
	if ps.OpenAlerts[RuleNEWS2Aggregate] != first[0].AlertId || ps.AlertEvalTimeMs != t0 {
		t.Fatalf("proto %v", &ps)
	}
	back := FromProto(&ps)
	if got := e.Evaluate(&back, score(t0+1000, ten), Trigger{}); len(got) != 0 {
		t.Fatalf("restored state raised again: %v", kinds(got))
	}
	if got := e.Evaluate(&back, score(t0+500, well), Trigger{}); len(got) != 0 {
		t.Fatalf("restored state took an older score: %v", kinds(got))
	}
	got := e.Evaluate(&back, score(t0+2000, well), Trigger{})
	if len(got) != 1 || got[0].Type != resolved || got[0].AlertId != first[0].AlertId {
		t.Fatalf("resolution after restore: %v", got)
	}
	if !back.Empty() && len(back.Open) != 0 {
		t.Errorf("open alerts left: %v", back.Open)
	}
}

func TestOtherKindsIgnored(t *testing.T) {
	e := New(NEWS2Rules())
	var st State
	s := score(t0, ten)
	s.Kind = "mews"
	if got := e.Evaluate(&st, s, Trigger{}); got != nil {
		t.Errorf("NEWS2 rules fired on a %s score: %v", s.Kind, kinds(got))
	}
}
