package alertapi

import (
	"fmt"
	"testing"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func event(id, typ string, at int64) *vigilv1.AlertEvent {
	t := map[string]vigilv1.AlertEventType{
		"raised": vigilv1.AlertEventType_ALERT_EVENT_RAISED, "escalated": vigilv1.AlertEventType_ALERT_EVENT_ESCALATED,
		"acknowledged": vigilv1.AlertEventType_ALERT_EVENT_ACKNOWLEDGED, "resolved": vigilv1.AlertEventType_ALERT_EVENT_RESOLVED,
		"rechecked": vigilv1.AlertEventType_ALERT_EVENT_RECHECKED,
	}[typ]
	e := &vigilv1.AlertEvent{EventId: id + "/" + typ, AlertId: id, Tenant: "t", Patient: "p-" + id, Type: t, EventTimeMs: at,
		Location: "ICU" + id[len(id)-1:] + "^1", Ward: "ICU" + id[len(id)-1:]}
	if t == vigilv1.AlertEventType_ALERT_EVENT_ACKNOWLEDGED {
		e.AcknowledgedBy, e.Actor, e.CommandId = "kim", "kim", "cmd-"+id
	}
	return e
}

// TestModelStatesBoundsAndWaiters: the read model follows each alert's
// state, filters by state, patient and ward, keeps at most max_closed
// closed alerts (counting what it drops), ignores redelivered events and
// wakes the waiter of an acknowledgement.
func TestModelStatesBoundsAndWaiters(t *testing.T) {
	evicted := map[bool]int{}
	m := newModel(100, 2, func(open bool) { evicted[open]++ })
	for i := range 4 {
		id := fmt.Sprintf("a%d", i)
		m.apply(event(id, "raised", int64(i)))
	}
	ch, cancel := m.wait("cmd-a1")
	defer cancel()
	m.apply(event("a1", "escalated", 10))
	m.apply(event("a1", "acknowledged", 11))
	m.apply(event("a1", "acknowledged", 11)) // redelivered
	select {
	case a := <-ch:
		if a.State != "acknowledged" || a.AcknowledgedBy != "kim" || a.Tier != 0 || len(a.Events) != 3 {
			t.Errorf("woken with %+v", a)
		}
	default:
		t.Fatal("waiter not woken")
	}
	if got := m.list(Filter{State: "open"}, 10); len(got) != 4 || got[0].ID != "a1" {
		t.Errorf("open: %+v", got)
	}
	if got := m.list(Filter{State: "acknowledged"}, 10); len(got) != 1 || got[0].ID != "a1" {
		t.Errorf("acknowledged: %+v", got)
	}
	if got := m.list(Filter{State: "open", Ward: "icu2"}, 10); len(got) != 1 || got[0].ID != "a2" {
		t.Errorf("ward ICU2: %+v", got)
	}
	m.apply(event("a0", "resolved", 20))
	m.apply(event("a2", "rechecked", 21))
	m.apply(event("a3", "resolved", 22)) // third closed: a0 (least recently closed) goes
	if _, ok := m.get("a0"); ok || evicted[false] != 1 || evicted[true] != 0 {
		t.Errorf("a0 kept or eviction not counted: %v", evicted)
	}
	if got := m.list(Filter{State: "all"}, 10); len(got) != 3 {
		t.Errorf("all: %+v", got)
	}
	if got := m.list(Filter{State: "open", Patient: "p-a3"}, 10); len(got) != 0 {
		t.Errorf("resolved alert listed as open: %+v", got)
	}
	if a, _ := m.get("a2"); a.State != "rechecked_away" {
		t.Errorf("a2 state %s", a.State)
	}
	if o, c := m.counts(); o != 1 || c != 2 {
		t.Errorf("counts %d open %d closed", o, c)
	}
}
