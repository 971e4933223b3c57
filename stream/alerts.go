package stream

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/detectors/alerting"
	"github.com/vigilhealth/vigil/features/window"
	"github.com/vigilhealth/vigil/internal/config"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// alertRules is the engine's side of the rules over window features
// (alerts.lifecycle.rules): which statistics of which metrics to read at
// each score-window end. Immutable after newAlertRules.
type alertRules struct {
	// features maps a metric to the stats its feature rules read.
	features map[string][]string
	// spec names the window spec that made the features (the ruleset of
	// the feature scores).
	specVersion, specHash string
}

// newAlertRules loads the alert rules file and returns its evaluator and
// the feature statistics its rules read.
func newAlertRules(cfg config.Config, spec *window.Spec) (*alerting.Evaluator, *alertRules, error) {
	f, err := alerting.Load(cfg.Alerts.Lifecycle.Rules)
	if err != nil {
		return nil, nil, fmt.Errorf("alerts.lifecycle.rules: %w", err)
	}
	eval := alerting.New(f)
	a := &alertRules{features: map[string][]string{}}
	if spec != nil {
		a.specVersion, a.specHash = fmt.Sprint(spec.Version), spec.Hash
	}
	for _, ref := range eval.FeatureRefs() {
		if !slices.Contains(a.features[ref[0]], ref[1]) {
			a.features[ref[0]] = append(a.features[ref[0]], ref[1])
		}
	}
	return eval, a, nil
}

// command applies an alert command batch (no samples) to p: an
// acknowledgement of an open alert emits ACKNOWLEDGED; one of an alert
// that is not open (unknown, resolved, acknowledged already) changes
// nothing. It reports whether p changed.
func (e *engine) command(p *patient, b *vigilv1.SampleBatch, nowMs int64, out *outputs) bool {
	cmd := b.GetAlertCommand()
	tr := alerting.Trigger{IngestTimeMs: b.GetIngestTimeMs(), EmittedTimeMs: nowMs, Location: p.location, Tenant: p.tenant, Patient: p.id}
	ev, res := e.alerts.Acknowledge(&p.alerts, cmd, tr)
	if res != alerting.Acked {
		return false
	}
	out.list = append(out.list, output{kind: outAlert, key: p.key, alert: ev})
	return true
}

// featureAlerts evaluates the feature rules on the rows [lo, hi) of a
// closed score window of p (at its end, endMs) and appends the events.
// It allocates only for metrics that have feature rules.
func (e *engine) featureAlerts(list []output, p *patient, cols *window.Columns, lo, hi int, endMs int64, tr alerting.Trigger) []output {
	if len(e.alertRules.features) == 0 {
		return list
	}
	tr.Location, tr.Tenant, tr.Patient = p.location, p.tenant, p.id
	for i := lo; i < hi; i++ {
		stats := e.alertRules.features[cols.Metric.Value(i)]
		for _, stat := range stats {
			var v float64
			switch stat {
			case "last":
				v = cols.Last.Value(i)
			case "mean":
				v = cols.Mean.Value(i)
			case "min":
				v = cols.Min.Value(i)
			case "max":
				v = cols.Max.Value(i)
			}
			metric := strings.Clone(cols.Metric.Value(i))
			s := alerting.FeatureScore(p.tenant, p.id, metric, stat, strings.Clone(cols.Unit.Value(i)), v, endMs, cols.LastTimeMs.Value(i),
				"window:"+cols.Window.Value(i), e.alertRules.specVersion, e.alertRules.specHash)
			for _, ev := range e.alerts.Evaluate(&p.alerts, s, tr) {
				list = append(list, output{kind: outAlert, key: p.key, alert: ev})
			}
		}
	}
	return list
}

// alertsDue reports whether p has an alert timer due at nowMs.
func alertsDue(p *patient, nowMs int64) bool {
	d := p.alerts.NextDueMs()
	return d > 0 && d <= nowMs
}

// alertTimers runs p's due alert timers (re-check timeouts, escalations)
// at processing time nowMs and reports whether p changed.
func (e *engine) alertTimers(p *patient, nowMs int64, out *outputs) bool {
	tr := e.trigger(p, nowMs)
	tr.Location, tr.Tenant, tr.Patient = p.location, p.tenant, p.id
	evs := e.alerts.Tick(&p.alerts, nowMs, tr)
	for _, ev := range evs {
		out.list = append(out.list, output{kind: outAlert, key: p.key, alert: ev})
	}
	return len(evs) > 0
}

// alertPollDeadline returns when a poll between transactions must return
// for the next alert timer check.
func (s *session) alertPollDeadline() time.Time {
	if s.alertNext.IsZero() {
		s.alertNext = time.Now().Add(s.p.cfg.Alerts.Lifecycle.TimerCheckInterval)
	}
	return s.alertNext
}

// timerPollDeadline is the earlier of the idle-check and alert-timer
// deadlines of a poll between transactions.
func (s *session) timerPollDeadline() (time.Time, bool) {
	t := s.alertPollDeadline()
	if it, ok := s.idlePollDeadline(); ok && it.Before(t) {
		t = it
	}
	return t, true
}

// expireAlertTimers, when an alert timer check is due, runs the due timers
// of every owned patient (engine.alertTimers) and commits what they emit
// in a transaction of its own with every pending patient state, as
// expireIdle does: no input record stands for a timer in a restore's
// replay, so its events and the state that emitted them commit together.
func (s *session) expireAlertTimers() error {
	if time.Now().Before(s.alertPollDeadline()) {
		return nil
	}
	s.alertNext = time.Now().Add(s.p.cfg.Alerts.Lifecycle.TimerCheckInterval)
	nowMs := s.p.clock.Now().UnixMilli()
	return s.timerPass("alert timers", func(p *patient) bool { return alertsDue(p, nowMs) },
		func(p *patient, out *outputs) bool { return s.p.eng.alertTimers(p, nowMs, out) })
}
