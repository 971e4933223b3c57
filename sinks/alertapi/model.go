package alertapi

import (
	"container/list"
	"encoding/json"
	"slices"
	"strings"
	"sync"

	"google.golang.org/protobuf/encoding/protojson"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Alert is the read model's view of one alert, as the API answers it.
type Alert struct {
	ID       string `json:"id"`
	Tenant   string `json:"tenant"`
	Patient  string `json:"patient"`
	Rule     string `json:"rule"`
	Severity string `json:"severity"`
	// State: "pending" (seen only by a RECHECKED or SUPPRESSED event),
	// "open", "acknowledged", "resolved", "rechecked_away", "suppressed".
	State    string `json:"state"`
	Tier     uint32 `json:"tier"`
	MaxTier  uint32 `json:"max_tier"`
	Location string `json:"location,omitempty"`
	Ward     string `json:"ward,omitempty"`
	// RaisedTimeMs is when the condition first held (event time);
	// UpdatedTimeMs the event time of the newest event.
	RaisedTimeMs   int64  `json:"raised_time_ms"`
	UpdatedTimeMs  int64  `json:"updated_time_ms"`
	RecheckOutcome string `json:"recheck_outcome,omitempty"`
	Reason         string `json:"reason"`
	// Acknowledgement.
	AcknowledgedBy     string `json:"acknowledged_by,omitempty"`
	AcknowledgedTimeMs int64  `json:"acknowledged_time_ms,omitempty"`
	Note               string `json:"note,omitempty"`
	SuppressedUntilMs  int64  `json:"suppressed_until_ms,omitempty"`
	// The rules file and the ruleset or model behind the alert.
	RulesName      string  `json:"rules_name"`
	RulesVersion   string  `json:"rules_version"`
	RulesHash      string  `json:"rules_hash"`
	Ruleset        string  `json:"ruleset"`
	RulesetVersion string  `json:"ruleset_version"`
	RulesetHash    string  `json:"ruleset_hash"`
	Source         string  `json:"source"`
	Value          float64 `json:"value"`
	// Explanation is the newest score behind the alert (protobuf JSON,
	// field names as in the .proto): components with inputs and times.
	Explanation json.RawMessage `json:"explanation,omitempty"`
	// Events are the lifecycle events seen, oldest first (the last
	// maxEvents).
	Events []Event `json:"events"`
}

// Event is one lifecycle event of an Alert.
type Event struct {
	ID            string `json:"id"`
	Type          string `json:"type"`
	TimeMs        int64  `json:"time_ms"`
	EmittedTimeMs int64  `json:"emitted_time_ms"`
	Tier          uint32 `json:"tier"`
	Actor         string `json:"actor,omitempty"`
	Reason        string `json:"reason"`
}

// maxEvents bounds the events kept per alert.
const maxEvents = 32

// closedStates are the states of alerts that are over.
func closed(state string) bool {
	return state == "resolved" || state == "rechecked_away" || state == "suppressed"
}

// model is the read model: every alert not over (bounded by maxOpen) and
// the maxClosed most recently closed. Safe for concurrent use.
type model struct {
	mu       sync.Mutex
	alerts   map[string]*item
	open     *list.List // of *item, oldest first
	closed   *list.List // of *item, least recently closed first
	maxOpen  int
	maxClose int
	// waiters are woken when an ACKNOWLEDGED event of their command
	// arrives.
	waiters map[string]chan Alert
	// evicted counts alerts dropped to keep the bounds.
	onEvict func(open bool)
}

type item struct {
	a  Alert
	el *list.Element
}

func newModel(maxOpen, maxClosed int, onEvict func(open bool)) *model {
	return &model{alerts: map[string]*item{}, open: list.New(), closed: list.New(), maxOpen: maxOpen, maxClose: maxClosed,
		waiters: map[string]chan Alert{}, onEvict: onEvict}
}

// apply folds one event into the model.
func (m *model) apply(ev *vigilv1.AlertEvent) {
	m.mu.Lock()
	defer m.mu.Unlock()
	it, ok := m.alerts[ev.GetAlertId()]
	if !ok {
		it = &item{a: Alert{ID: ev.GetAlertId(), Tenant: ev.GetTenant(), Patient: ev.GetPatient(), Rule: ev.GetRule(), State: "pending"}}
		m.alerts[it.a.ID] = it
	}
	for _, e := range it.a.Events {
		if e.ID == ev.GetEventId() {
			return // a redelivered event
		}
	}
	a := &it.a
	wasClosed := closed(a.State)
	a.Severity, a.Tier, a.MaxTier, a.Reason = ev.GetSeverity(), ev.GetTier(), ev.GetMaxTier(), ev.GetReason()
	if ev.GetLocation() != "" {
		a.Location, a.Ward = ev.GetLocation(), ev.GetWard()
	}
	a.RaisedTimeMs = ev.GetRaisedEventTimeMs()
	a.UpdatedTimeMs = max(a.UpdatedTimeMs, ev.GetEventTimeMs())
	a.RulesName, a.RulesVersion, a.RulesHash = ev.GetRulesName(), ev.GetRulesVersion(), ev.GetRulesHash()
	a.Ruleset, a.RulesetVersion, a.RulesetHash = ev.GetRuleset(), ev.GetRulesetVersion(), ev.GetRulesetHash()
	a.Source, a.Value = ev.GetSource(), ev.GetValue()
	if o := ev.GetRecheckOutcome(); o != "" {
		a.RecheckOutcome = o
	}
	if ev.GetAcknowledgedBy() != "" {
		a.AcknowledgedBy, a.AcknowledgedTimeMs = ev.GetAcknowledgedBy(), ev.GetAcknowledgedTimeMs()
	}
	if ev.GetSuppressedUntilMs() != 0 {
		a.SuppressedUntilMs = ev.GetSuppressedUntilMs()
	}
	if sc := ev.GetScore(); sc != nil {
		if b, err := (protojson.MarshalOptions{UseProtoNames: true}).Marshal(sc); err == nil {
			a.Explanation = b
		}
	}
	switch ev.GetType() {
	case vigilv1.AlertEventType_ALERT_EVENT_RAISED, vigilv1.AlertEventType_ALERT_EVENT_ESCALATED:
		a.State = "open"
		if a.AcknowledgedBy != "" {
			a.State = "acknowledged"
		}
	case vigilv1.AlertEventType_ALERT_EVENT_ACKNOWLEDGED:
		a.State, a.Note = "acknowledged", ev.GetNote()
	case vigilv1.AlertEventType_ALERT_EVENT_RESOLVED:
		a.State = "resolved"
	case vigilv1.AlertEventType_ALERT_EVENT_RECHECKED:
		a.State = "rechecked_away"
	case vigilv1.AlertEventType_ALERT_EVENT_SUPPRESSED:
		a.State = "suppressed"
	}
	a.Events = append(a.Events, Event{ID: ev.GetEventId(), Type: ev.GetType().Label(), TimeMs: ev.GetEventTimeMs(),
		EmittedTimeMs: ev.GetEmittedTimeMs(), Tier: ev.GetTier(), Actor: ev.GetActor(), Reason: ev.GetReason()})
	if n := len(a.Events); n > maxEvents {
		a.Events = slices.Delete(a.Events, 0, n-maxEvents)
	}
	// Move between the open and closed lists.
	switch nowClosed := closed(a.State); {
	case it.el == nil && !nowClosed:
		it.el = m.open.PushBack(it)
	case it.el == nil:
		it.el = m.closed.PushBack(it)
	case !wasClosed && nowClosed:
		m.open.Remove(it.el)
		it.el = m.closed.PushBack(it)
	case wasClosed && !nowClosed:
		m.closed.Remove(it.el)
		it.el = m.open.PushBack(it)
	case nowClosed:
		m.closed.MoveToBack(it.el)
	}
	for m.closed.Len() > m.maxClose {
		m.evict(m.closed, false)
	}
	for m.open.Len() > m.maxOpen {
		m.evict(m.open, true)
	}
	if ev.GetType() == vigilv1.AlertEventType_ALERT_EVENT_ACKNOWLEDGED {
		if ch, ok := m.waiters[ev.GetCommandId()]; ok {
			ch <- m.copyLocked(it) // buffered, one send: the waiter is removed
			delete(m.waiters, ev.GetCommandId())
		}
	}
}

func (m *model) evict(l *list.List, open bool) {
	it := l.Remove(l.Front()).(*item)
	delete(m.alerts, it.a.ID)
	if m.onEvict != nil {
		m.onEvict(open)
	}
}

func (m *model) copyLocked(it *item) Alert {
	a := it.a
	a.Events = slices.Clone(a.Events)
	return a
}

// get returns the alert with id.
func (m *model) get(id string) (Alert, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	it, ok := m.alerts[id]
	if !ok {
		return Alert{}, false
	}
	return m.copyLocked(it), true
}

// Filter selects alerts for list.
type Filter struct {
	// State: "open" (not over: open or acknowledged), "acknowledged",
	// or "all".
	State   string
	Tenant  string
	Patient string
	Ward    string
}

// list returns the alerts matching f, newest first, at most limit.
func (m *model) list(f Filter, limit int) []Alert {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Alert
	add := func(l *list.List) {
		for el := l.Back(); el != nil; el = el.Prev() {
			it := el.Value.(*item)
			a := &it.a
			switch {
			case f.State == "acknowledged" && a.State != "acknowledged",
				f.State == "open" && a.State != "open" && a.State != "acknowledged",
				f.Tenant != "" && a.Tenant != f.Tenant,
				f.Patient != "" && a.Patient != f.Patient,
				f.Ward != "" && !strings.EqualFold(a.Ward, f.Ward):
				continue
			}
			out = append(out, m.copyLocked(it))
		}
	}
	add(m.open)
	if f.State == "all" {
		add(m.closed)
	}
	slices.SortStableFunc(out, func(a, b Alert) int {
		switch {
		case a.UpdatedTimeMs > b.UpdatedTimeMs:
			return -1
		case a.UpdatedTimeMs < b.UpdatedTimeMs:
			return 1
		}
		return strings.Compare(a.ID, b.ID)
	})
	if len(out) > limit {
		out = out[:limit]
	}
	return out
}

// wait registers a waiter for the ACKNOWLEDGED event of command id; the
// returned channel receives the alert once. cancel removes it.
func (m *model) wait(id string) (ch <-chan Alert, cancel func()) {
	c := make(chan Alert, 1)
	m.mu.Lock()
	m.waiters[id] = c
	m.mu.Unlock()
	return c, func() {
		m.mu.Lock()
		delete(m.waiters, id)
		m.mu.Unlock()
	}
}

// counts returns the open and closed alerts held.
func (m *model) counts() (open, closedN int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.open.Len(), m.closed.Len()
}
