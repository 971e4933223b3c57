// Package alerting turns scores into alert lifecycle events. A Rule is a
// condition over a score; per patient and rule an alert is raised when the
// condition starts to hold, is not repeated while it stays raised, and is
// resolved when the condition no longer holds.
//
// The state machine is per (patient, rule), kept in State (plain data,
// serialisable into the stream changelog). Today it knows two transitions,
// raised and resolved; re-check, escalation and acknowledgement are new
// transitions on the same Open entry (it already carries a tier).
//
// Alerts follow event time forward: a score older than the newest score
// already evaluated for the patient does not change alert state (a
// window-end score that trails the patient's newest readings is history,
// not news).
//
// Rules and Evaluator are immutable and safe for concurrent use; a State
// belongs to the goroutine that owns its patient.
package alerting

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/vigilhealth/vigil/detectors/ews"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Rule names of the NEWS2 rules.
const (
	RuleNEWS2Aggregate = "news2_aggregate_ge_5"
	RuleNEWS2SingleRed = "news2_single_parameter_3"
)

// Rule is one alert condition over scores of one kind.
type Rule struct {
	Name string
	// Kind is the Score.kind the rule reads ("news2").
	Kind string
	// Check reports whether the condition holds for s, the severity
	// ("low", "medium", "high") it would raise with, and a sentence saying
	// why. It must be a pure function of s.
	Check func(s *vigilv1.Score) (holds bool, severity, reason string)
	// Holds, when set, reports what Check's holds would, without building
	// the reason: Evaluate then calls Check only when the rule's alert
	// opens or resolves, so that a score that changes no alert costs no
	// allocation (the reasons are formatted text). It must agree with
	// Check on every score.
	Holds func(s *vigilv1.Score) bool
}

// NEWS2Rules are the rules over NEWS2, after the RCP 2017 thresholds and
// triggers (chart 2):
//
//   - news2_aggregate_ge_5: aggregate 5 or more; severity medium, high at 7
//     or more (the "urgent" and "emergency" response thresholds).
//   - news2_single_parameter_3: a single parameter scores 3 while the
//     aggregate is below 5 (the chart's low-medium band; at 5 or more the
//     aggregate alert covers the patient). Severity medium: the chart asks
//     for an urgent ward-based response, and our severity scale has no
//     low-medium.
func NEWS2Rules() []Rule {
	return []Rule{
		{
			Name: RuleNEWS2Aggregate, Kind: ews.KindNEWS2,
			Holds: func(s *vigilv1.Score) bool { return s.GetValue() >= 5 },
			Check: func(s *vigilv1.Score) (bool, string, string) {
				v := s.GetValue()
				if v < 5 {
					return false, "", fmt.Sprintf("NEWS2 aggregate %s is below 5", num(v))
				}
				sev := "medium"
				if v >= 7 {
					sev = "high"
				}
				return true, sev, fmt.Sprintf("NEWS2 aggregate %s >= 5 (%s): %s", num(v), s.GetBand(), contributors(s))
			},
		},
		{
			Name: RuleNEWS2SingleRed, Kind: ews.KindNEWS2,
			Holds: func(s *vigilv1.Score) bool { return s.GetSingleParameterRed() && s.GetValue() < 5 },
			Check: func(s *vigilv1.Score) (bool, string, string) {
				v := s.GetValue()
				switch {
				case !s.GetSingleParameterRed():
					return false, "", "no single NEWS2 parameter scores 3"
				case v >= 5:
					return false, "", fmt.Sprintf("NEWS2 aggregate %s >= 5 covers the single-parameter trigger", num(v))
				}
				return true, "medium", fmt.Sprintf("NEWS2 single parameter scores 3 (aggregate %s, %s): %s", num(v), s.GetBand(), contributors(s))
			},
		},
	}
}

func num(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }

// contributors renders the scoring components, most points first.
func contributors(s *vigilv1.Score) string {
	var parts []string
	for _, name := range s.GetTopContributors() {
		for _, c := range s.GetComponents() {
			if c.GetParameter() == name {
				parts = append(parts, fmt.Sprintf("%s %s (%s %s)", name, num(c.GetPoints()), num(c.GetInputValue()), c.GetInputUnit()))
				break
			}
		}
	}
	if len(parts) == 0 {
		return "no parameter scored"
	}
	return strings.Join(parts, ", ")
}

// Open is one raised, unresolved alert.
type Open struct {
	AlertID  string
	Rule     string
	Severity string
	// RaisedEventTimeMs is the event time of the raising score.
	RaisedEventTimeMs int64
	// Tier is the escalation tier, 0 for the first.
	Tier uint32
}

// State is one patient's alert state.
type State struct {
	// Open alerts, sorted by rule.
	Open []Open
	// LastEvalMs is the event time of the newest score evaluated; 0 before
	// the first.
	LastEvalMs int64
}

// Empty reports whether the state holds nothing.
func (st *State) Empty() bool { return len(st.Open) == 0 && st.LastEvalMs == 0 }

// ToProto writes the state into ps (alerts, open_alerts index, eval time).
func (st *State) ToProto(ps *vigilv1.PatientState) {
	ps.Alerts = ps.Alerts[:0]
	ps.OpenAlerts = nil
	if len(st.Open) > 0 {
		ps.OpenAlerts = make(map[string]string, len(st.Open))
	}
	for _, o := range st.Open {
		ps.Alerts = append(ps.Alerts, &vigilv1.OpenAlert{AlertId: o.AlertID, Rule: o.Rule, Severity: o.Severity,
			RaisedEventTimeMs: o.RaisedEventTimeMs, Tier: o.Tier})
		ps.OpenAlerts[o.Rule] = o.AlertID
	}
	ps.AlertEvalTimeMs = st.LastEvalMs
}

// FromProto reads a state written by ToProto.
func FromProto(ps *vigilv1.PatientState) State {
	st := State{LastEvalMs: ps.GetAlertEvalTimeMs()}
	for _, a := range ps.GetAlerts() {
		st.Open = append(st.Open, Open{AlertID: a.GetAlertId(), Rule: a.GetRule(), Severity: a.GetSeverity(),
			RaisedEventTimeMs: a.GetRaisedEventTimeMs(), Tier: a.GetTier()})
	}
	slices.SortFunc(st.Open, func(a, b Open) int { return strings.Compare(a.Rule, b.Rule) })
	return st
}

func (st *State) find(rule string) int {
	for i := range st.Open {
		if st.Open[i].Rule == rule {
			return i
		}
	}
	return -1
}

// Evaluator runs a set of rules.
type Evaluator struct {
	rules []Rule
}

// New returns an Evaluator of rules (evaluated in the given order).
func New(rules []Rule) *Evaluator { return &Evaluator{rules: slices.Clone(rules)} }

// Trigger says what drove an evaluation, for the events' timing fields.
type Trigger struct {
	// IngestTimeMs is when Vigil accepted the newest sample that drove
	// the score (the input batch being processed).
	IngestTimeMs int64
	// EmittedTimeMs is the processing time of emission.
	EmittedTimeMs int64
}

// Evaluate runs every rule of the score's kind on s, updates st and
// returns the lifecycle events (raises first, then resolutions, each in
// rule order), or nil when nothing changed. The events reference s (not a
// copy): the caller must not modify s afterwards. A score older than
// st.LastEvalMs is ignored.
func (e *Evaluator) Evaluate(st *State, s *vigilv1.Score, tr Trigger) []*vigilv1.AlertEvent {
	at := s.GetEventTimeMs()
	if at < st.LastEvalMs {
		return nil
	}
	st.LastEvalMs = at
	var raised, resolved []*vigilv1.AlertEvent
	for _, r := range e.rules {
		if r.Kind != s.GetKind() {
			continue
		}
		i := st.find(r.Name)
		if r.Holds != nil && r.Holds(s) == (i >= 0) {
			continue // no transition: skip building the reason
		}
		holds, severity, reason := r.Check(s)
		switch {
		case holds && i < 0:
			o := Open{
				AlertID:           ews.HashID("alert", s.GetTenant(), s.GetPatient(), r.Name, strconv.FormatInt(at, 10)),
				Rule:              r.Name,
				Severity:          severity,
				RaisedEventTimeMs: at,
			}
			st.Open = append(st.Open, o)
			raised = append(raised, event(o, vigilv1.AlertEventType_ALERT_EVENT_RAISED, reason, s, tr))
		case !holds && i >= 0:
			o := st.Open[i]
			st.Open = slices.Delete(st.Open, i, i+1)
			resolved = append(resolved, event(o, vigilv1.AlertEventType_ALERT_EVENT_RESOLVED, reason, s, tr))
		}
	}
	slices.SortFunc(st.Open, func(a, b Open) int { return strings.Compare(a.Rule, b.Rule) })
	return append(raised, resolved...)
}

func event(o Open, typ vigilv1.AlertEventType, reason string, s *vigilv1.Score, tr Trigger) *vigilv1.AlertEvent {
	at := s.GetEventTimeMs()
	return &vigilv1.AlertEvent{
		SchemaVersion:       1,
		EventId:             ews.HashID("alert-event", o.AlertID, typ.String(), strconv.FormatInt(at, 10)),
		AlertId:             o.AlertID,
		Tenant:              s.GetTenant(),
		Patient:             s.GetPatient(),
		Type:                typ,
		Rule:                o.Rule,
		Severity:            o.Severity,
		Reason:              reason,
		Score:               s,
		Ruleset:             s.GetRuleset(),
		RulesetVersion:      s.GetRulesetVersion(),
		RulesetHash:         s.GetRulesetHash(),
		EventTimeMs:         at,
		EmittedTimeMs:       tr.EmittedTimeMs,
		TriggerIngestTimeMs: tr.IngestTimeMs,
		Tier:                o.Tier,
	}
}
