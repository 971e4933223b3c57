// Package alerting turns scores into alert lifecycle events. Rules are data
// (a versioned YAML rules file, see rules.yaml and File); per patient and
// rule a small state machine (Track) moves an alert through its lifecycle:
//
//	(nothing) --holds--> pending --confirmed/timeout--> open --beyond clear for resolve_after--> resolved
//	                        \--cleared--> rechecked away
//	open --not acknowledged in escalate_after--> escalated (tier+1, up to max_tier)
//	open --acknowledged--> open (acknowledged; re-raises suppressed for suppress_after_ack)
//	(nothing) --holds inside a suppression--> suppressed --clears--> (nothing)
//
// Score-driven transitions follow event time: a score older than the newest
// score already evaluated for the patient does not change alert state (a
// window-end score that trails the patient's newest readings is history, not
// news), and the re-check window, the resolution delay and the suppression
// are measured in event time, so a replay gives the same transitions. The
// re-check timeout and escalation are processing-time timers (Tick), run by
// the caller's clock.
//
// State is plain data, serialisable into the stream changelog
// (ToProto/FromProto restore it exactly). Evaluator is immutable and safe
// for concurrent use; a State belongs to the goroutine that owns its
// patient.
package alerting

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/detectors/ews"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Phases of a Track.
const (
	// PhaseNone: no episode; the track only keeps a suppression window.
	PhaseNone = ""
	// PhasePending: the condition held, the re-check is waiting.
	PhasePending = "pending"
	// PhaseOpen: raised (notified), not resolved.
	PhaseOpen = "open"
	// PhaseSuppressed: the condition holds inside a suppression window.
	PhaseSuppressed = "suppressed"
)

// Re-check outcomes (AlertEvent.recheck_outcome).
const (
	RecheckConfirmed = "confirmed"
	RecheckCleared   = "cleared"
	RecheckTimeout   = "timeout"
)

// Track is one patient's lifecycle state of one rule. Times named Event are
// event time, the others processing time (Unix epoch ms).
type Track struct {
	Rule    string
	AlertID string
	Phase   string
	// Severity raised with.
	Severity string
	// StartEventMs is when the condition first held.
	StartEventMs int64
	// RecheckDeadlineMs: the re-check times out (PhasePending).
	RecheckDeadlineMs int64
	Tier              uint32
	// EscalateAtMs: the next escalation is due; 0: none.
	EscalateAtMs int64
	// BelowSinceEventMs: since when the value is beyond clear; 0: not.
	BelowSinceEventMs int64
	AckedBy           string
	AckedMs           int64
	CommandID         string
	// SuppressedUntilMs (event time): re-raises are suppressed before it.
	SuppressedUntilMs int64
	// Score is the newest score the rule evaluated for the episode.
	Score *vigilv1.Score
}

// State is one patient's alert state.
type State struct {
	// Tracks, sorted by rule.
	Tracks []Track
	// LastEvalMs is the event time of the newest score evaluated; 0 before
	// the first.
	LastEvalMs int64
}

// Empty reports whether the state holds nothing.
func (st *State) Empty() bool { return len(st.Tracks) == 0 && st.LastEvalMs == 0 }

// Open returns the tracks of raised, unresolved alerts.
func (st *State) Open() []Track {
	var out []Track
	for _, t := range st.Tracks {
		if t.Phase == PhaseOpen {
			out = append(out, t)
		}
	}
	return out
}

// NextDueMs returns the earliest processing time a timer of st is due
// (re-check timeout or escalation), 0 when none is set.
func (st *State) NextDueMs() int64 {
	var due int64
	for i := range st.Tracks {
		t := &st.Tracks[i]
		var d int64
		switch {
		case t.Phase == PhasePending:
			d = t.RecheckDeadlineMs
		case t.Phase == PhaseOpen && t.AckedBy == "":
			d = t.EscalateAtMs
		}
		if d > 0 && (due == 0 || d < due) {
			due = d
		}
	}
	return due
}

// ToProto writes the state into ps: alert_tracks, and for readers of the
// first schema the open alerts (alerts, open_alerts) and the eval time.
func (st *State) ToProto(ps *vigilv1.PatientState) {
	ps.Alerts = ps.Alerts[:0]
	ps.OpenAlerts = nil
	ps.AlertTracks = ps.AlertTracks[:0]
	for _, t := range st.Tracks {
		ps.AlertTracks = append(ps.AlertTracks, &vigilv1.AlertTrack{
			Rule: t.Rule, AlertId: t.AlertID, Phase: t.Phase, Severity: t.Severity, StartEventMs: t.StartEventMs,
			RecheckDeadlineMs: t.RecheckDeadlineMs, Tier: t.Tier, EscalateAtMs: t.EscalateAtMs,
			BelowSinceEventMs: t.BelowSinceEventMs, AcknowledgedBy: t.AckedBy, AcknowledgedTimeMs: t.AckedMs,
			SuppressedUntilMs: t.SuppressedUntilMs, Score: t.Score, CommandId: t.CommandID,
		})
		if t.Phase != PhaseOpen {
			continue
		}
		if ps.OpenAlerts == nil {
			ps.OpenAlerts = map[string]string{}
		}
		ps.Alerts = append(ps.Alerts, &vigilv1.OpenAlert{AlertId: t.AlertID, Rule: t.Rule, Severity: t.Severity,
			RaisedEventTimeMs: t.StartEventMs, Tier: t.Tier})
		ps.OpenAlerts[t.Rule] = t.AlertID
	}
	ps.AlertEvalTimeMs = st.LastEvalMs
}

// FromProto reads a state written by ToProto. A state of the first schema
// (open alerts only, no tracks) is read as open tracks.
func FromProto(ps *vigilv1.PatientState) State {
	st := State{LastEvalMs: ps.GetAlertEvalTimeMs()}
	for _, a := range ps.GetAlertTracks() {
		st.Tracks = append(st.Tracks, Track{
			Rule: a.GetRule(), AlertID: a.GetAlertId(), Phase: a.GetPhase(), Severity: a.GetSeverity(),
			StartEventMs: a.GetStartEventMs(), RecheckDeadlineMs: a.GetRecheckDeadlineMs(), Tier: a.GetTier(),
			EscalateAtMs: a.GetEscalateAtMs(), BelowSinceEventMs: a.GetBelowSinceEventMs(), AckedBy: a.GetAcknowledgedBy(),
			AckedMs: a.GetAcknowledgedTimeMs(), SuppressedUntilMs: a.GetSuppressedUntilMs(), Score: a.GetScore(),
			CommandID: a.GetCommandId(),
		})
	}
	if len(ps.GetAlertTracks()) == 0 {
		for _, a := range ps.GetAlerts() {
			st.Tracks = append(st.Tracks, Track{AlertID: a.GetAlertId(), Rule: a.GetRule(), Severity: a.GetSeverity(),
				Phase: PhaseOpen, StartEventMs: a.GetRaisedEventTimeMs(), Tier: a.GetTier()})
		}
	}
	st.sort()
	return st
}

func (st *State) sort() {
	slices.SortFunc(st.Tracks, func(a, b Track) int { return strings.Compare(a.Rule, b.Rule) })
}

func (st *State) find(rule string) int {
	for i := range st.Tracks {
		if st.Tracks[i].Rule == rule {
			return i
		}
	}
	return -1
}

// Evaluator runs the rules of one rules file.
type Evaluator struct {
	file *File
	// rules in evaluation order: by group, higher rank first, then name.
	rules []*Rule
	// manifest returns a model kind's threshold (for raise: manifest).
	manifest func(kind string) (float64, bool)
	kinds    []string
}

// Option configures an Evaluator.
type Option func(*Evaluator)

// WithManifestThresholds sets how rules with `raise: manifest` find their
// model's threshold (by score kind, "model:<name>"); without it such rules
// never hold. fn must be safe for concurrent use.
func WithManifestThresholds(fn func(kind string) (float64, bool)) Option {
	return func(e *Evaluator) { e.manifest = fn }
}

// New returns an Evaluator of the rules of f (which must not be modified
// afterwards).
func New(f *File, opts ...Option) *Evaluator {
	e := &Evaluator{file: f}
	for i := range f.Rules {
		e.rules = append(e.rules, &f.Rules[i])
		if !slices.Contains(e.kinds, f.Rules[i].kind) {
			e.kinds = append(e.kinds, f.Rules[i].kind)
		}
	}
	slices.SortStableFunc(e.rules, func(a, b *Rule) int {
		if c := strings.Compare(a.Group, b.Group); c != 0 {
			return c
		}
		if a.Rank != b.Rank {
			return b.Rank - a.Rank
		}
		return strings.Compare(a.Name, b.Name)
	})
	for _, o := range opts {
		o(e)
	}
	return e
}

// File returns the rules file the Evaluator runs.
func (e *Evaluator) File() *File { return e.file }

// Kinds returns the score kinds the rules read (feature rules as
// "feature:<metric>:<stat>").
func (e *Evaluator) Kinds() []string { return e.kinds }

// FeatureRefs returns the (metric, stat) pairs of the feature rules.
func (e *Evaluator) FeatureRefs() [][2]string {
	var out [][2]string
	for _, r := range e.rules {
		if r.Feature != "" {
			m, s, _ := strings.Cut(r.Feature, ":")
			out = append(out, [2]string{m, s})
		}
	}
	return out
}

// Trigger says what drove an evaluation, for the events' timing and
// location fields.
type Trigger struct {
	// IngestTimeMs is when Vigil accepted the newest sample that drove
	// the score (the input batch being processed).
	IngestTimeMs int64
	// EmittedTimeMs is the processing time of emission (and of the
	// timers' deadlines).
	EmittedTimeMs int64
	// Location is the patient's newest bed; the ward is its first '^'
	// component.
	Location string
	// Tenant and Patient name the patient for events without a score
	// (timers, commands on restored state); empty: the score's.
	Tenant, Patient string
}

func (e *Evaluator) rule(name string) *Rule {
	for _, r := range e.rules {
		if r.Name == name {
			return r
		}
	}
	return nil
}

// blocked reports whether a rule of r's group with a higher rank has an
// alert pending or open.
func (e *Evaluator) blocked(st *State, r *Rule) bool {
	for i := range st.Tracks {
		t := &st.Tracks[i]
		if t.Phase != PhasePending && t.Phase != PhaseOpen || t.Rule == r.Name {
			continue
		}
		if o := e.rule(t.Rule); o != nil && o.Group == r.Group && o.Rank > r.Rank {
			return true
		}
	}
	return false
}

// Evaluate runs every rule of the score's kind on s, updates st and
// returns the lifecycle events in rule order, or nil when nothing changed.
// The events reference s (not a copy), and so does st: the caller must not
// modify s afterwards. A score older than st.LastEvalMs is ignored. A
// score that changes no alert does not allocate.
func (e *Evaluator) Evaluate(st *State, s *vigilv1.Score, tr Trigger) []*vigilv1.AlertEvent {
	at := s.GetEventTimeMs()
	if at < st.LastEvalMs {
		return nil
	}
	st.LastEvalMs = at
	var out []*vigilv1.AlertEvent
	kind := s.GetKind()
	for _, r := range e.rules {
		if r.kind != kind {
			continue
		}
		raise, clear, ok := r.thresholds(e.manifest)
		if !ok {
			continue
		}
		v := r.read(s)
		hi, lo := r.holds(v, raise), r.clears(v, clear)
		i := st.find(r.Name)
		if i < 0 && !hi {
			continue // the common case: nothing open, nothing holds
		}
		c := cond{r: r, v: v, raise: raise, clear: clear, s: s, at: at, tr: tr}
		if i < 0 {
			st.Tracks = append(st.Tracks, Track{Rule: r.Name})
			i = len(st.Tracks) - 1
		}
		out = e.step(st, i, c, hi, lo, out)
	}
	st.compact(at)
	return out
}

// cond is one evaluation of a rule.
type cond struct {
	r            *Rule
	v            float64
	raise, clear float64
	s            *vigilv1.Score
	at           int64
	tr           Trigger
}

// step moves track i by one score.
func (e *Evaluator) step(st *State, i int, c cond, hi, lo bool, out []*vigilv1.AlertEvent) []*vigilv1.AlertEvent {
	t := &st.Tracks[i]
	r := c.r
	switch t.Phase {
	case PhaseNone:
		if !hi || e.blocked(st, r) {
			return out
		}
		*t = Track{Rule: r.Name, SuppressedUntilMs: t.SuppressedUntilMs, AckedBy: t.AckedBy, AckedMs: t.AckedMs,
			AlertID:  ews.HashID("alert", c.s.GetTenant(), c.s.GetPatient(), r.Name, strconv.FormatInt(c.at, 10)),
			Severity: r.severity(c.v), StartEventMs: c.at, Score: c.s}
		switch {
		case c.at < t.SuppressedUntilMs:
			t.Phase = PhaseSuppressed
			why := fmt.Sprintf("%s; suppressed until %s: acknowledged by %s at %s", e.reason(r, c), fmtMs(t.SuppressedUntilMs), t.AckedBy, fmtMs(t.AckedMs))
			ev := e.event(t, vigilv1.AlertEventType_ALERT_EVENT_SUPPRESSED, why, c.s, c.at, c.tr, c)
			ev.SuppressedUntilMs = t.SuppressedUntilMs
			return append(out, ev)
		case r.Recheck > 0:
			t.Phase = PhasePending
			t.RecheckDeadlineMs = c.tr.EmittedTimeMs + r.Recheck.Milliseconds()
			return out
		}
		t.AckedBy, t.AckedMs = "", 0
		return append(out, e.raise(t, r, c, "", e.reason(r, c)))
	case PhasePending:
		t.Score = c.s
		if c.at > t.StartEventMs+r.Recheck.Milliseconds() {
			// No score within the re-check time: raise anyway, then the
			// score is the open alert's first.
			out = append(out, e.raise(t, r, c, RecheckTimeout, fmt.Sprintf("%s; no re-check score within %s of %s, raised unconfirmed",
				e.reason(r, c), r.Recheck, fmtMs(t.StartEventMs))))
			return e.step(st, i, c, hi, lo, out)
		}
		switch {
		case c.at == t.StartEventMs:
			return out // the same moment again: no re-check
		case hi:
			return append(out, e.raise(t, r, c, RecheckConfirmed, fmt.Sprintf("%s; confirmed by the re-check at %s", e.reason(r, c), fmtMs(c.at))))
		case lo:
			ev := e.event(t, vigilv1.AlertEventType_ALERT_EVENT_RECHECKED,
				fmt.Sprintf("re-checked away: %s %s is %s clear %s at %s, within %s of %s", r.source(), num(c.v), side(r), num(c.clear), fmtMs(c.at), r.Recheck, fmtMs(t.StartEventMs)),
				c.s, c.at, c.tr, c)
			ev.RecheckOutcome, ev.State = RecheckCleared, "rechecked_away"
			t.reset()
			return append(out, ev)
		}
		return out
	case PhaseOpen:
		t.Score = c.s
		if !lo {
			t.BelowSinceEventMs = 0
			return out
		}
		if t.BelowSinceEventMs == 0 {
			t.BelowSinceEventMs = c.at
		}
		if c.at-t.BelowSinceEventMs < r.ResolveAfter.Milliseconds() {
			return out
		}
		why := fmt.Sprintf("%s %s is %s clear %s", r.source(), num(c.v), side(r), num(c.clear))
		if r.ResolveAfter > 0 {
			why += fmt.Sprintf(" since %s (resolve_after %s)", fmtMs(t.BelowSinceEventMs), r.ResolveAfter)
		}
		ev := e.event(t, vigilv1.AlertEventType_ALERT_EVENT_RESOLVED, why, c.s, c.at, c.tr, c)
		ev.State = "resolved"
		t.reset()
		return append(out, ev)
	case PhaseSuppressed:
		t.Score = c.s
		switch {
		case lo:
			t.reset() // the suppressed episode ends unnotified
		case hi && c.at >= t.SuppressedUntilMs:
			t.AckedBy, t.AckedMs = "", 0
			return append(out, e.raise(t, r, c, "", e.reason(r, c)+"; the suppression after acknowledgement ended"))
		}
	}
	return out
}

// reset ends t's episode, keeping a running suppression window.
func (t *Track) reset() {
	*t = Track{Rule: t.Rule, SuppressedUntilMs: t.SuppressedUntilMs, AckedBy: t.AckedBy, AckedMs: t.AckedMs}
}

// compact drops tracks that hold neither an episode nor a suppression
// window still running at event time at.
func (st *State) compact(at int64) {
	st.Tracks = slices.DeleteFunc(st.Tracks, func(t Track) bool { return t.Phase == PhaseNone && t.SuppressedUntilMs <= at })
	st.sort()
}

func (e *Evaluator) raise(t *Track, r *Rule, c cond, outcome, why string) *vigilv1.AlertEvent {
	t.Phase = PhaseOpen
	t.RecheckDeadlineMs = 0
	t.BelowSinceEventMs = 0
	t.Score = c.s
	if r.EscalateAfter > 0 && r.MaxTier > 0 {
		t.EscalateAtMs = c.tr.EmittedTimeMs + r.EscalateAfter.Milliseconds()
	}
	at := max(c.at, t.StartEventMs)
	ev := e.event(t, vigilv1.AlertEventType_ALERT_EVENT_RAISED, why, c.s, at, c.tr, c)
	ev.RecheckOutcome = outcome
	return ev
}

func (e *Evaluator) reason(r *Rule, c cond) string {
	op := ">="
	if !r.above {
		op = "<="
	}
	s := fmt.Sprintf("%s %s %s %s", r.source(), num(c.v), op, num(c.raise))
	if b := c.s.GetBand(); b != "" {
		s += " (" + b + ")"
	}
	if r.Score != "" {
		s += ": " + contributors(c.s)
	}
	return s
}

func side(r *Rule) string {
	if r.above {
		return "below"
	}
	return "above"
}

// Tick runs the processing-time timers of st at nowMs: re-checks that
// timed out raise (outcome "timeout"), unacknowledged open alerts whose
// escalation is due escalate. It returns the events, nil when none.
func (e *Evaluator) Tick(st *State, nowMs int64, tr Trigger) []*vigilv1.AlertEvent {
	var out []*vigilv1.AlertEvent
	tr.EmittedTimeMs = nowMs
	for i := range st.Tracks {
		t := &st.Tracks[i]
		r := e.rule(t.Rule)
		if r == nil {
			continue // the rule left the rules file: its alert waits for an ack or a restart of its episode
		}
		switch {
		case t.Phase == PhasePending && t.RecheckDeadlineMs > 0 && nowMs >= t.RecheckDeadlineMs:
			raise, clear, _ := r.thresholds(e.manifest)
			c := cond{r: r, v: r.read(t.Score), raise: raise, clear: clear, s: t.Score, at: max(st.LastEvalMs, t.StartEventMs), tr: tr}
			out = append(out, e.raise(t, r, c, RecheckTimeout, fmt.Sprintf("%s; no re-check score within %s (processing time), raised unconfirmed",
				e.reason(r, c), r.Recheck)))
		case t.Phase == PhaseOpen && t.AckedBy == "" && t.EscalateAtMs > 0 && nowMs >= t.EscalateAtMs:
			t.Tier++
			t.EscalateAtMs = 0
			if t.Tier < r.MaxTier {
				t.EscalateAtMs = nowMs + r.EscalateAfter.Milliseconds()
			}
			raise, clear, _ := r.thresholds(e.manifest)
			c := cond{r: r, v: r.read(t.Score), raise: raise, clear: clear, s: t.Score, at: max(st.LastEvalMs, t.StartEventMs), tr: tr}
			ev := e.event(t, vigilv1.AlertEventType_ALERT_EVENT_ESCALATED,
				fmt.Sprintf("not acknowledged within %s: escalated to tier %d of %d", r.EscalateAfter, t.Tier, r.MaxTier), t.Score, c.at, tr, c)
			out = append(out, ev)
		}
	}
	return out
}

// AckResult is what Acknowledge did.
type AckResult int

// Results of Acknowledge.
const (
	// Acked: the alert was open and is acknowledged now.
	Acked AckResult = iota
	// AlreadyAcked: it was acknowledged before (no event).
	AlreadyAcked
	// NotOpen: no open alert of st has the id (unknown, pending,
	// suppressed or resolved; no event).
	NotOpen
)

// Acknowledge applies an acknowledgement command to st: the open alert
// cmd names is acknowledged by cmd.user at cmd.time_ms (its escalation
// stops, and re-raises of its rule are suppressed until time_ms +
// suppress_after_ack). It returns the ACKNOWLEDGED event (nil unless
// Acked).
func (e *Evaluator) Acknowledge(st *State, cmd *vigilv1.AlertCommand, tr Trigger) (*vigilv1.AlertEvent, AckResult) {
	for i := range st.Tracks {
		t := &st.Tracks[i]
		if t.AlertID != cmd.GetAlertId() || t.Phase != PhaseOpen {
			continue
		}
		if t.AckedBy != "" {
			return nil, AlreadyAcked
		}
		r := e.rule(t.Rule)
		var suppress time.Duration
		c := cond{s: t.Score, at: cmd.GetTimeMs(), tr: tr}
		if r != nil {
			suppress = r.SuppressAfterAck
			c.r = r
			c.raise, c.clear, _ = r.thresholds(e.manifest)
			c.v = r.read(t.Score)
		}
		t.AckedBy, t.AckedMs, t.CommandID = cmd.GetUser(), cmd.GetTimeMs(), cmd.GetCommandId()
		t.EscalateAtMs = 0
		t.SuppressedUntilMs = cmd.GetTimeMs() + suppress.Milliseconds()
		why := fmt.Sprintf("acknowledged by %s at tier %d", cmd.GetUser(), t.Tier)
		if suppress > 0 {
			why += fmt.Sprintf("; re-raises suppressed for %s", suppress)
		}
		ev := e.event(t, vigilv1.AlertEventType_ALERT_EVENT_ACKNOWLEDGED, why, t.Score, cmd.GetTimeMs(), tr, c)
		ev.Actor, ev.Note = cmd.GetUser(), cmd.GetNote()
		return ev, Acked
	}
	return nil, NotOpen
}

// event builds the event of a transition of t at event time at.
func (e *Evaluator) event(t *Track, typ vigilv1.AlertEventType, reason string, s *vigilv1.Score, at int64, tr Trigger, c cond) *vigilv1.AlertEvent {
	idParts := []string{"alert-event", t.AlertID, typ.String(), strconv.FormatInt(at, 10)}
	switch typ {
	case vigilv1.AlertEventType_ALERT_EVENT_ESCALATED:
		idParts = append(idParts, strconv.FormatUint(uint64(t.Tier), 10))
	case vigilv1.AlertEventType_ALERT_EVENT_ACKNOWLEDGED:
		idParts = append(idParts, t.CommandID)
	}
	ward, _, _ := strings.Cut(tr.Location, "^")
	tenant, patient := tr.Tenant, tr.Patient
	if tenant == "" {
		tenant, patient = s.GetTenant(), s.GetPatient()
	}
	state := "open"
	if t.AckedBy != "" && t.Phase == PhaseOpen {
		state = "acknowledged"
	}
	if t.Phase == PhaseSuppressed {
		state = "suppressed"
	}
	ev := &vigilv1.AlertEvent{
		SchemaVersion:       2,
		EventId:             ews.HashID(idParts...),
		AlertId:             t.AlertID,
		Tenant:              tenant,
		Patient:             patient,
		Type:                typ,
		Rule:                t.Rule,
		Severity:            t.Severity,
		Reason:              reason,
		Score:               s,
		Ruleset:             s.GetRuleset(),
		RulesetVersion:      s.GetRulesetVersion(),
		RulesetHash:         s.GetRulesetHash(),
		EventTimeMs:         at,
		EmittedTimeMs:       tr.EmittedTimeMs,
		TriggerIngestTimeMs: tr.IngestTimeMs,
		Tier:                t.Tier,
		Location:            tr.Location,
		Ward:                ward,
		RulesName:           e.file.Name,
		RulesVersion:        e.file.Version,
		RulesHash:           e.file.Hash,
		Value:               c.v,
		RaiseThreshold:      c.raise,
		ClearThreshold:      c.clear,
		RaisedEventTimeMs:   t.StartEventMs,
		AcknowledgedBy:      t.AckedBy,
		AcknowledgedTimeMs:  t.AckedMs,
		CommandId:           t.CommandID,
		State:               state,
	}
	if t.AckedBy != "" {
		ev.SuppressedUntilMs = t.SuppressedUntilMs
	}
	if c.r != nil {
		ev.Source = c.r.source()
		ev.MaxTier = c.r.MaxTier
		if t.Phase == PhaseOpen && t.AckedBy == "" && t.EscalateAtMs > 0 {
			ev.EscalateAfterMs = c.r.EscalateAfter.Milliseconds()
		}
	}
	return ev
}

func num(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }

func fmtMs(ms int64) string { return time.UnixMilli(ms).UTC().Format("2006-01-02T15:04:05.000Z") }

// contributors renders the scoring components, most points first, with
// their input values and times.
func contributors(s *vigilv1.Score) string {
	var parts []string
	for _, name := range s.GetTopContributors() {
		for _, c := range s.GetComponents() {
			if c.GetParameter() == name {
				parts = append(parts, fmt.Sprintf("%s %s (%s %s at %s)", name, num(c.GetPoints()), num(c.GetInputValue()), c.GetInputUnit(), fmtMs(c.GetInputTimeMs())))
				break
			}
		}
	}
	if len(parts) == 0 {
		return "no parameter scored"
	}
	return strings.Join(parts, ", ")
}

// FeatureScore makes the Score a feature rule evaluates: kind
// "feature:<metric>:<stat>", the feature's value, and one component naming
// the metric, its value, unit and the time of the window's last sample.
// ruleset, version and hash name the window spec that made the feature.
func FeatureScore(tenant, patient, metric, stat, unit string, value float64, atMs, lastTimeMs int64, ruleset, version, hash string) *vigilv1.Score {
	kind := "feature:" + metric + ":" + stat
	return &vigilv1.Score{
		SchemaVersion: 1, Id: ews.HashID("feature-score", tenant, patient, kind, strconv.FormatInt(atMs, 10)),
		Tenant: tenant, Patient: patient, Kind: kind, Value: value, Ruleset: ruleset, RulesetVersion: version,
		RulesetHash: hash, EventTimeMs: atMs, TopContributors: []string{metric},
		Components: []*vigilv1.ScoreComponent{{Parameter: metric, Metric: metric, InputValue: value, InputUnit: unit, InputTimeMs: lastTimeMs, Band: stat}},
	}
}
