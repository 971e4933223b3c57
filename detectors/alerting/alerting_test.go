package alerting

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/detectors/ews"
	"github.com/vigilhealth/vigil/internal/clock"
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

const (
	raised     = vigilv1.AlertEventType_ALERT_EVENT_RAISED
	rechecked  = vigilv1.AlertEventType_ALERT_EVENT_RECHECKED
	escalated  = vigilv1.AlertEventType_ALERT_EVENT_ESCALATED
	acked      = vigilv1.AlertEventType_ALERT_EVENT_ACKNOWLEDGED
	resolved   = vigilv1.AlertEventType_ALERT_EVENT_RESOLVED
	suppressed = vigilv1.AlertEventType_ALERT_EVENT_SUPPRESSED
)

// ev is what a test checks of an event: "type rule severity tier outcome".
func ev(e *vigilv1.AlertEvent) string {
	return strings.TrimSpace(fmt.Sprintf("%s %s %s t%d %s", e.Type.Label(), e.Rule, e.Severity, e.Tier, e.RecheckOutcome))
}

func evs(es []*vigilv1.AlertEvent) []string {
	var out []string
	for _, e := range es {
		out = append(out, ev(e))
	}
	return out
}

const lifecycleRules = `
name: test-rules
version: "7"
rules:
  - name: agg
    score: news2
    group: news2
    rank: 2
    raise: 5
    clear: 3
    severity: medium
    severities: [{at: 7, severity: high}]
    recheck: 60s
    resolve_after: 120s
    suppress_after_ack: 10m
    escalate_after: 5m
    max_tier: 2
  - name: red
    score: news2
    field: single_parameter_red
    group: news2
    rank: 1
    raise: 1
  - name: spo2_low
    feature: spo2:min
    direction: below
    raise: 90
    clear: 92
`

// step is one action on the state machine: a score, a clock move with a
// timer tick, or an acknowledgement of the last raised alert.
type step struct {
	name string
	// score at event time at (one of the vitals maps), or
	at int64
	v  map[string]float64
	// a raw score instead (features)
	raw *vigilv1.Score
	// tick after advancing the processing clock by adv
	adv  time.Duration
	tick bool
	// ack by user at event time ackAt
	ack   string
	ackAt int64
	want  []string
	// wantAck is the acknowledgement result when ack is set
	wantAck AckResult
}

func run(t *testing.T, rules string, steps []step) (*State, []*vigilv1.AlertEvent) {
	t.Helper()
	f, err := Parse([]byte(rules))
	if err != nil {
		t.Fatal(err)
	}
	e := New(f)
	clk := clock.NewManual(time.UnixMilli(t0))
	var st State
	var all []*vigilv1.AlertEvent
	var lastRaised string
	for _, s := range steps {
		clk.Advance(s.adv)
		now := clk.Now().UnixMilli()
		tr := Trigger{IngestTimeMs: now - 3, EmittedTimeMs: now, Location: "ICU1^07^A"}
		var got []*vigilv1.AlertEvent
		switch {
		case s.ack != "":
			ev, res := e.Acknowledge(&st, &vigilv1.AlertCommand{AlertId: lastRaised, User: s.ack, Note: "on it", TimeMs: s.ackAt, CommandId: "c-" + s.name}, tr)
			if res != s.wantAck {
				t.Fatalf("%s: ack result %v, want %v", s.name, res, s.wantAck)
			}
			if ev != nil {
				got = append(got, ev)
			}
		case s.tick:
			got = e.Tick(&st, now, tr)
		case s.raw != nil:
			got = e.Evaluate(&st, s.raw, tr)
		default:
			got = e.Evaluate(&st, score(s.at, s.v), tr)
		}
		if g := evs(got); strings.Join(g, "|") != strings.Join(s.want, "|") {
			t.Fatalf("%s: events %q, want %q", s.name, g, s.want)
		}
		for _, g := range got {
			if g.RulesName != "test-rules" || g.RulesVersion != "7" || g.RulesHash != f.Hash || len(g.RulesHash) != 64 {
				t.Errorf("%s: rules file not named: %q %q %q", s.name, g.RulesName, g.RulesVersion, g.RulesHash)
			}
			if g.Location != "ICU1^07^A" || g.Ward != "ICU1" || g.EmittedTimeMs != now || g.Tenant != "st-mary" || g.Patient != "p-1" {
				t.Errorf("%s: location/ward/time/patient %q %q %d %s/%s", s.name, g.Location, g.Ward, g.EmittedTimeMs, g.Tenant, g.Patient)
			}
			if g.Score == nil || g.Reason == "" || g.EventId == "" || g.AlertId == "" {
				t.Errorf("%s: event without explanation or ids: %v", s.name, g)
			}
			if g.Type == raised {
				lastRaised = g.AlertId
			}
		}
		all = append(all, got...)
		// The state survives the changelog exactly.
		var ps vigilv1.PatientState
		st.ToProto(&ps)
		b, err := proto.Marshal(&ps)
		if err != nil {
			t.Fatal(err)
		}
		var back vigilv1.PatientState
		if err := proto.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		rs := FromProto(&back)
		var ps2 vigilv1.PatientState
		rs.ToProto(&ps2)
		if !proto.Equal(&ps, &ps2) {
			t.Fatalf("%s: state changed through the changelog:\n%v\n%v", s.name, &ps, &ps2)
		}
		st = rs
	}
	return &st, all
}

func TestLifecycle(t *testing.T) {
	sec := int64(1000)
	steps := []step{
		{name: "aggregate 4: nothing", at: t0, v: four},
		{name: "aggregate 10: pending re-check, not notified", at: t0 + 10*sec, v: ten},
		{name: "an older well score: ignored", at: t0 + 5*sec, v: well},
		{name: "same moment again: still pending", at: t0 + 10*sec, v: ten},
		{name: "confirmed within 60 s: raised high", at: t0 + 40*sec, v: ten, want: []string{"raised agg high t0 confirmed"}},
		{name: "aggregate 6: open, not repeated", at: t0 + 50*sec, v: six},
		{name: "4 min later: no escalation yet", adv: 4 * time.Minute, tick: true},
		{name: "5 min: escalated to tier 1", adv: time.Minute, tick: true, want: []string{"escalated agg high t1"}},
		{name: "tick again at once: nothing", tick: true},
		{name: "5 more min: tier 2", adv: 5 * time.Minute, tick: true, want: []string{"escalated agg high t2"}},
		{name: "max tier: no more", adv: 30 * time.Minute, tick: true},
		{name: "acknowledged", ack: "nurse.kim", ackAt: t0 + 60*sec, want: []string{"acknowledged agg high t2"}, wantAck: Acked},
		{name: "acknowledged twice: no event", ack: "nurse.lee", ackAt: t0 + 61*sec, wantAck: AlreadyAcked},
		{name: "aggregate 4 (between clear and raise): stays open", at: t0 + 70*sec, v: four},
		{name: "well: below clear, resolution waits", at: t0 + 80*sec, v: well},
		{name: "four: back above clear resets the wait", at: t0 + 150*sec, v: four},
		{name: "well again", at: t0 + 160*sec, v: well},
		{name: "well 119 s later: still open", at: t0 + 279*sec, v: well},
		{name: "well 120 s later: resolved", at: t0 + 280*sec, v: well, want: []string{"resolved agg high t2"}},
		{name: "re-raise inside the suppression: suppressed", at: t0 + 300*sec, v: six, want: []string{"suppressed agg medium t0"}},
		{name: "clears: suppressed episode ends unnotified", at: t0 + 310*sec, v: well},
		{name: "after the suppression: pending again", at: t0 + 700*sec, v: six},
		{name: "well within the re-check: re-checked away", at: t0 + 720*sec, v: well, want: []string{"rechecked agg medium t0 cleared"}},
		{name: "ack of a resolved alert: no event", ack: "nurse.kim", ackAt: t0 + 721*sec, wantAck: NotOpen},
		{name: "ten: pending", at: t0 + 800*sec, v: ten},
		{name: "no score within 60 s processing time: raised anyway", adv: 61 * time.Second, tick: true, want: []string{"raised agg high t0 timeout"}},
	}
	st, all := run(t, lifecycleRules, steps)
	if o := st.Open(); len(o) != 1 || o[0].Rule != "agg" {
		t.Errorf("open at the end: %+v", o)
	}
	// The acknowledgement names the actor, the note and the suppression.
	for _, e := range all {
		if e.Type == acked && (e.Actor != "nurse.kim" || e.Note != "on it" || e.SuppressedUntilMs != t0+60000+600000 || e.State != "acknowledged") {
			t.Errorf("ack event %v", e)
		}
		if e.Type == rechecked && (e.State != "rechecked_away" || !strings.Contains(e.Reason, "re-checked away")) {
			t.Errorf("recheck event %v", e)
		}
		if e.Type == suppressed && !strings.Contains(e.Reason, "nurse.kim") {
			t.Errorf("suppressed event does not say why: %s", e.Reason)
		}
	}
}

// TestLateRecheckRaisesUnconfirmed: a score after the re-check time (event
// time) means no re-check came: the alert is raised unconfirmed, and the
// late score then counts as the open alert's.
func TestLateRecheckRaisesUnconfirmed(t *testing.T) {
	run(t, lifecycleRules, []step{
		{name: "ten: pending", at: t0, v: ten},
		{name: "well 61 s later: raised (timeout), the well score starts the resolution wait", at: t0 + 61000, v: well,
			want: []string{"raised agg high t0 timeout"}},
		{name: "well 120 s on: resolved", at: t0 + 181000, v: well, want: []string{"resolved agg high t0"}},
	})
}

// TestGroupDeduplication: the single-parameter rule does not raise while
// the aggregate (higher rank, same group) is pending or open.
func TestGroupDeduplication(t *testing.T) {
	redTen := map[string]float64{"respiratory_rate": 25, "spo2": 93, "systolic_bp": 98, "heart_rate": 131, "consciousness": 0, "body_temperature": 38.5}
	run(t, lifecycleRules, []step{
		{name: "red alone: raised (no re-check on red)", at: t0, v: redSat, want: []string{"raised red medium t0"}},
		{name: "well: red resolved", at: t0 + 1000, v: well, want: []string{"resolved red medium t0"}},
		{name: "red and aggregate 10+: aggregate pending, red blocked", at: t0 + 2000, v: redTen},
		{name: "confirmed: only the aggregate raises", at: t0 + 3000, v: redTen, want: []string{"raised agg high t0 confirmed"}},
	})
}

func TestFeatureRuleBelow(t *testing.T) {
	spo2 := func(at int64, v float64) *vigilv1.Score {
		return FeatureScore("st-mary", "p-1", "spo2", "min", "%", v, at, at-2000, "window:1m", "1", "abc")
	}
	run(t, lifecycleRules, []step{
		{name: "min 91: nothing", raw: spo2(t0, 91)},
		{name: "min 90: raised", raw: spo2(t0+60000, 90), want: []string{"raised spo2_low medium t0"}},
		{name: "min 91: hysteresis, open", raw: spo2(t0+120000, 91)},
		{name: "min 93: resolved", raw: spo2(t0+180000, 93), want: []string{"resolved spo2_low medium t0"}},
	})
}

func TestManifestThreshold(t *testing.T) {
	f, err := Parse([]byte(`
name: m
version: "1"
rules:
  - {name: sepsis, score: "model:sepsis", raise: manifest}
`))
	if err != nil {
		t.Fatal(err)
	}
	s := &vigilv1.Score{Tenant: "t", Patient: "p", Kind: "model:sepsis", Value: 0.06, EventTimeMs: t0}
	var st State
	if got := New(f).Evaluate(&st, s, Trigger{}); got != nil {
		t.Fatalf("raised without a known manifest threshold: %v", evs(got))
	}
	e := New(f, WithManifestThresholds(func(kind string) (float64, bool) { return 0.05, kind == "model:sepsis" }))
	st = State{}
	got := e.Evaluate(&st, s, Trigger{})
	if len(got) != 1 || got[0].Type != raised || got[0].RaiseThreshold != 0.05 || got[0].Value != 0.06 || got[0].Source != "score:model:sepsis" {
		t.Fatalf("events %v", got)
	}
}

func TestDeterministicIDs(t *testing.T) {
	a := func() []*vigilv1.AlertEvent {
		_, all := run(t, lifecycleRules, []step{
			{name: "ten", at: t0, v: ten}, {name: "ten", at: t0 + 1000, v: ten, want: []string{"raised agg high t0 confirmed"}},
			{name: "esc", adv: 5 * time.Minute, tick: true, want: []string{"escalated agg high t1"}},
		})
		return all
	}
	x, y := a(), a()
	for i := range x {
		if x[i].EventId != y[i].EventId || x[i].AlertId != y[i].AlertId {
			t.Errorf("event %d ids differ between runs", i)
		}
	}
	if x[0].EventId == x[1].EventId || x[0].AlertId != x[1].AlertId {
		t.Error("raise and escalation share an event id, or differ in alert id")
	}
}

func TestParseRefusesBadRules(t *testing.T) {
	for name, doc := range map[string]string{
		"unknown key":       "name: x\nversion: '1'\nrules:\n  - {name: a, score: news2, raise: 5, colour: red}\n",
		"no raise":          "name: x\nversion: '1'\nrules:\n  - {name: a, score: news2}\n",
		"score and feature": "name: x\nversion: '1'\nrules:\n  - {name: a, score: news2, feature: 'spo2:min', raise: 5}\n",
		"bad stat":          "name: x\nversion: '1'\nrules:\n  - {name: a, feature: 'spo2:median', raise: 5}\n",
		"clear above raise": "name: x\nversion: '1'\nrules:\n  - {name: a, score: news2, raise: 5, clear: 6}\n",
		"manifest on news2": "name: x\nversion: '1'\nrules:\n  - {name: a, score: news2, raise: manifest}\n",
		"duplicate":         "name: x\nversion: '1'\nrules:\n  - {name: a, score: news2, raise: 5}\n  - {name: a, score: mews, raise: 5}\n",
		"tier without time": "name: x\nversion: '1'\nrules:\n  - {name: a, score: news2, raise: 5, max_tier: 2}\n",
		"no version":        "name: x\nrules:\n  - {name: a, score: news2, raise: 5}\n",
	} {
		if _, err := Parse([]byte(doc)); err == nil {
			t.Errorf("%s: parsed", name)
		}
	}
	d := Default()
	if d.Name == "" || len(d.Hash) != 64 || len(d.Rules) != 2 {
		t.Errorf("default rules %+v", d)
	}
}

// TestDefaultRulesKeepNEWS2Triggers: the embedded rules raise on the RCP
// triggers at once (no re-check), aggregate first.
func TestDefaultRulesKeepNEWS2Triggers(t *testing.T) {
	e := New(Default())
	var st State
	for _, c := range []struct {
		at   int64
		v    map[string]float64
		want string
	}{
		{t0, four, ""},
		{t0 + 1000, ten, "raised " + RuleNEWS2Aggregate + " high t0"},
		{t0 + 2000, redSat, "resolved " + RuleNEWS2Aggregate + " high t0|raised " + RuleNEWS2SingleRed + " medium t0"},
		{t0 + 3000, well, "resolved " + RuleNEWS2SingleRed + " medium t0"},
		{t0 + 4000, six, "raised " + RuleNEWS2Aggregate + " medium t0"},
	} {
		if got := strings.Join(evs(e.Evaluate(&st, score(c.at, c.v), Trigger{})), "|"); got != c.want {
			t.Errorf("at +%d: %q, want %q", c.at-t0, got, c.want)
		}
	}
}

// TestNoAllocationWithoutTransition: a score that changes no alert costs
// no allocation (the engine evaluates every score).
func TestNoAllocationWithoutTransition(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	e := New(Default())
	var st State
	e.Evaluate(&st, score(t0, ten), Trigger{})
	s := score(t0+1000, six)
	w := score(t0+1000, four)
	w.Kind = "mews"
	if n := testing.AllocsPerRun(100, func() { e.Evaluate(&st, s, Trigger{}); e.Evaluate(&st, w, Trigger{}) }); n != 0 {
		t.Errorf("%v allocations per unchanged evaluation", n)
	}
}
