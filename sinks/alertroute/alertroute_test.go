package alertroute

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

const (
	raised  = vigilv1.AlertEventType_ALERT_EVENT_RAISED
	acked   = vigilv1.AlertEventType_ALERT_EVENT_ACKNOWLEDGED
	recheck = vigilv1.AlertEventType_ALERT_EVENT_RECHECKED
	escal   = vigilv1.AlertEventType_ALERT_EVENT_ESCALATED
	resolv  = vigilv1.AlertEventType_ALERT_EVENT_RESOLVED
	suppr   = vigilv1.AlertEventType_ALERT_EVENT_SUPPRESSED
)

func routesConfig(t *testing.T, hooks ...config.AlertWebhook) config.Config {
	cfg := testenv.Config(t, testenv.Kafka(t), "")
	rc := &cfg.Alerts.Routes
	rc.Webhooks = hooks
	rc.MaxAttempts = 3
	rc.RetryInitial = 40 * time.Millisecond
	rc.RetryMax = 400 * time.Millisecond
	rc.Timeout = 5 * time.Second
	rc.DrainTimeout = 10 * time.Second
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestWebhookDeliveryRetriesAndDeadLetters(t *testing.T) {
	const secret = "s3cret"
	flaky := newReceiver(t, secret, func(_ string, n int) int {
		if n <= 2 {
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	})
	refuses := newReceiver(t, secret, func(string, int) int { return http.StatusUnprocessableEntity })
	down := newReceiver(t, secret, func(string, int) int { return http.StatusInternalServerError })
	t.Setenv("VIGIL_TEST_FLAKY_SECRET", secret)
	high := newReceiver(t, "other-secret", nil)
	cfg := routesConfig(t,
		config.AlertWebhook{Name: "flaky", URL: flaky.srv.URL, SecretEnv: "VIGIL_TEST_FLAKY_SECRET"},
		config.AlertWebhook{Name: "refuses", URL: refuses.srv.URL, Secret: secret},
		config.AlertWebhook{Name: "down", URL: down.srv.URL, Secret: secret},
		config.AlertWebhook{Name: "high", URL: high.srv.URL, Secret: "other-secret", MinSeverity: "high", Events: []string{"raised"}, Wards: []string{"ICU1"}},
	)
	t0 := time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC).UnixMilli()
	evs := []*vigilv1.AlertEvent{
		event("e1", "a1", raised, "news2_high", "high", "ICU1^01", t0),
		event("e2", "a1", acked, "news2_high", "high", "ICU1^01", t0+60_000),
		event("e3", "a2", raised, "news2_medium", "medium", "ICU1^02", t0),
		event("e4", "a3", raised, "news2_high", "high", "ICU2^03", t0),
	}
	produce(t, cfg, evs...)
	r := start(t, cfg)
	waitFor(t, "every event finished on every route", 30*time.Second, func() bool {
		n := 0.0
		for _, route := range []string{"flaky", "refuses", "down", "high"} {
			for _, o := range []string{"delivered", "dead_lettered"} {
				v, _ := metric(t, r.reg, "vigil_alertroute_deliveries_total", map[string]string{"route": route, "outcome": o})
				n += v
			}
		}
		return n == 4+4+4+1
	})
	waitFor(t, "offsets committed", 10*time.Second, func() bool { c, e := committed(t, cfg); return c == e && e == 4 })
	defer func() {
		if err := r.shutdown(t); err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	// flaky: two 503s then 200, with backoff between the attempts.
	attempts, accepted, _, bad := flaky.snapshot()
	if bad != 0 {
		t.Errorf("flaky receiver saw %d requests with a bad signature or key", bad)
	}
	for _, ev := range evs {
		at := attempts[ev.EventId]
		if len(at) != 3 || accepted[ev.EventId] != 1 {
			t.Errorf("flaky %s: %d attempts, %d accepted; want 3 and 1", ev.EventId, len(at), accepted[ev.EventId])
			continue
		}
		// Equal jitter: the n-th delay is at least half of initial*2^(n-1).
		if g := at[1].Sub(at[0]); g < 20*time.Millisecond {
			t.Errorf("flaky %s: first retry after %s, want >= 20ms", ev.EventId, g)
		}
		if g := at[2].Sub(at[1]); g < 40*time.Millisecond {
			t.Errorf("flaky %s: second retry after %s, want >= 40ms", ev.EventId, g)
		}
	}
	if got := flaky.headerN["e1"]; !slices.Equal(got, []string{"1", "2", "3"}) {
		t.Errorf("attempt headers %v, want 1 2 3", got)
	}
	if v, _ := metric(t, r.reg, "vigil_alertroute_retries_total", map[string]string{"route": "flaky"}); v != 8 {
		t.Errorf("flaky retries %v, want 8 (2 per event)", v)
	}
	// refuses: 422 is permanent, one attempt each.
	attempts, _, _, _ = refuses.snapshot()
	for _, ev := range evs {
		if len(attempts[ev.EventId]) != 1 {
			t.Errorf("refuses %s: %d attempts, want 1 (4xx is permanent)", ev.EventId, len(attempts[ev.EventId]))
		}
	}
	// down: max_attempts attempts each.
	attempts, _, _, _ = down.snapshot()
	for _, ev := range evs {
		if len(attempts[ev.EventId]) != 3 {
			t.Errorf("down %s: %d attempts, want 3", ev.EventId, len(attempts[ev.EventId]))
		}
	}
	// high: only the high-severity RAISED event in ward ICU1.
	_, accepted, order, bad := high.snapshot()
	if !slices.Equal(order, []string{"e1"}) || accepted["e1"] != 1 || bad != 0 {
		t.Errorf("high route got %v (bad %d), want only e1", order, bad)
	}
	if high.lastTypes["e1"] != "raised" {
		t.Errorf("event type header %q", high.lastTypes["e1"])
	}

	// Dead letters: 4 permanent (refuses) and 4 after the last retry (down).
	dls := deadLetters(t, cfg, 8)
	byRoute := map[string][]*vigilv1.DeadLetter{}
	for _, dl := range dls {
		if dl.Reason != ReasonWebhookFailed {
			t.Errorf("dead letter reason %q, want %s", dl.Reason, ReasonWebhookFailed)
		}
		byRoute[dl.Field] = append(byRoute[dl.Field], dl)
		var ev vigilv1.AlertEvent
		if err := protojson.Unmarshal(dl.Raw, &ev); err != nil || ev.EventId != dl.MessageId || dl.Tenant != "t1" {
			t.Errorf("dead letter raw is not the event's JSON body (message id %q, err %v)", dl.MessageId, err)
		}
	}
	if len(byRoute["alerts.routes.webhooks.refuses"]) != 4 || len(byRoute["alerts.routes.webhooks.down"]) != 4 {
		t.Fatalf("dead letters per route: %s", jsonString(map[string]int{"refuses": len(byRoute["alerts.routes.webhooks.refuses"]), "down": len(byRoute["alerts.routes.webhooks.down"])}))
	}
	for _, dl := range byRoute["alerts.routes.webhooks.refuses"] {
		if !strings.Contains(dl.Message, "after 1 attempt(s); last status 422") || !strings.Contains(dl.Origin, "alert route refuses") {
			t.Errorf("refuses letter: %q / %q", dl.Message, dl.Origin)
		}
	}
	for _, dl := range byRoute["alerts.routes.webhooks.down"] {
		if !strings.Contains(dl.Message, "after 3 attempt(s); last status 500") || !strings.Contains(dl.Message, "Internal Server Error") {
			t.Errorf("down letter: %q", dl.Message)
		}
	}
	if v, _ := metric(t, r.reg, "vigil_alertroute_failures_total", map[string]string{"route": "refuses", "class": "permanent"}); v != 4 {
		t.Errorf("refuses permanent failures %v, want 4", v)
	}
	if v, _ := metric(t, r.reg, "vigil_alertroute_dead_letters_total", map[string]string{"route": "down", "reason": ReasonWebhookFailed}); v != 4 {
		t.Errorf("down dead letters %v, want 4", v)
	}
	if v, _ := metric(t, r.reg, "vigil_alertroute_delivery_seconds", map[string]string{"route": "flaky"}); v != 4 {
		t.Errorf("flaky delivery latency samples %v, want 4", v)
	}
}

// TestRestartLosesNothing stops the stage while a webhook refuses the
// later events: only the delivered prefix is committed, and a new stage in
// the same group delivers the rest without re-sending the committed ones.
func TestRestartLosesNothing(t *testing.T) {
	var accept = make(chan struct{})
	const first = 5
	rcv := newReceiver(t, "k", nil)
	idx := map[string]int{}
	rcv.status = func(id string, _ int) int {
		select {
		case <-accept:
			return http.StatusOK
		default:
		}
		if idx[id] < first {
			return http.StatusOK
		}
		return http.StatusBadGateway
	}
	cfg := routesConfig(t, config.AlertWebhook{Name: "ward", URL: rcv.srv.URL, Secret: "k"})
	cfg.Alerts.Routes.MaxAttempts = 100
	cfg.Alerts.Routes.RetryInitial = 10 * time.Millisecond
	cfg.Alerts.Routes.RetryMax = 30 * time.Millisecond
	cfg.Alerts.Routes.InFlight = 1
	cfg.Alerts.Routes.DrainTimeout = 300 * time.Millisecond
	t0 := time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC).UnixMilli()
	var evs []*vigilv1.AlertEvent
	for i := range 10 {
		id := fmt.Sprintf("e%02d", i)
		idx[id] = i
		evs = append(evs, event(id, "a1", raised, "news2_high", "high", "ICU1^01", t0+int64(i)*1000))
	}
	produce(t, cfg, evs...)

	r1 := start(t, cfg)
	waitFor(t, "the first events delivered and the next one retried", 30*time.Second, func() bool {
		at, acc, _, _ := rcv.snapshot()
		return len(acc) == first && len(at[evs[first].EventId]) >= 3
	})
	err := r1.shutdown(t)
	if err == nil || !strings.Contains(err.Error(), "not delivered within alerts.routes.drain_timeout") {
		t.Errorf("Run after an unfinished drain returned %v, want the not-delivered error", err)
	}
	if c, e := committed(t, cfg); c != first || e != 10 {
		t.Fatalf("committed %d of %d, want exactly the %d delivered", c, e, first)
	}

	close(accept)
	r2 := start(t, cfg)
	waitFor(t, "every event delivered after the restart", 30*time.Second, func() bool {
		_, acc, _, _ := rcv.snapshot()
		return len(acc) == 10
	})
	waitFor(t, "offsets committed", 10*time.Second, func() bool { c, e := committed(t, cfg); return c == e })
	if err := r2.shutdown(t); err != nil {
		t.Fatal(err)
	}
	_, acc, order, bad := rcv.snapshot()
	if bad != 0 {
		t.Errorf("%d bad requests", bad)
	}
	for _, ev := range evs[:first] {
		if acc[ev.EventId] != 1 {
			t.Errorf("%s accepted %d times, want once (it was committed before the restart)", ev.EventId, acc[ev.EventId])
		}
	}
	var want []string
	for _, ev := range evs {
		want = append(want, ev.EventId)
	}
	if !slices.Equal(order, want) {
		t.Errorf("delivery order %v, want %v (one partition, in_flight 1)", order, want)
	}
}

// TestSlowWebhookDoesNotBlockOthers: a webhook that never answers fills its
// bounded queue; its further events are dead-lettered as overflow after
// queue_wait while the other route gets everything.
func TestSlowWebhookDoesNotBlockOthers(t *testing.T) {
	stuck := newReceiver(t, "", nil)
	stuck.hold = make(chan struct{})
	fast := newReceiver(t, "", nil)
	cfg := routesConfig(t,
		config.AlertWebhook{Name: "stuck", URL: stuck.srv.URL},
		config.AlertWebhook{Name: "fast", URL: fast.srv.URL})
	rc := &cfg.Alerts.Routes
	rc.QueueSize, rc.InFlight, rc.QueueWait, rc.DrainTimeout = 2, 1, 100*time.Millisecond, 200*time.Millisecond
	t0 := time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC).UnixMilli()
	var evs []*vigilv1.AlertEvent
	for i := range 8 {
		evs = append(evs, event(fmt.Sprintf("e%d", i), fmt.Sprintf("a%d", i), raised, "r", "high", "ICU1^01", t0+int64(i)))
	}
	produce(t, cfg, evs...)
	r := start(t, cfg)
	waitFor(t, "the fast route to get every event", 20*time.Second, func() bool {
		_, acc, _, _ := fast.snapshot()
		return len(acc) == len(evs)
	})
	// One in flight, two queued, the other five overflow.
	waitFor(t, "overflow dead letters", 20*time.Second, func() bool {
		v, _ := metric(t, r.reg, "vigil_alertroute_overflow_total", map[string]string{"route": "stuck"})
		return v == 5
	})
	if q, _ := metric(t, r.reg, "vigil_alertroute_queue_length", map[string]string{"route": "stuck"}); q != 2 {
		t.Errorf("stuck queue length %v, want 2", q)
	}
	dls := deadLetters(t, cfg, 5)
	for _, dl := range dls {
		if dl.Reason != ReasonWebhookOverflow || dl.Field != "alerts.routes.webhooks.stuck" {
			t.Errorf("letter %s %s", dl.Reason, dl.Field)
		}
	}
	_ = r.shutdown(t)
	// The three held events were neither delivered nor dead-lettered: not
	// committed past the first of them.
	if c, e := committed(t, cfg); c >= e {
		t.Errorf("committed %d of %d although three events were never delivered to stuck", c, e)
	}
}

func TestVerify(t *testing.T) {
	body := []byte(`{"event_id":"e1"}`)
	now := time.Unix(1_800_000_000, 0)
	ts := fmt.Sprint(now.Unix())
	sig := Sign([]byte("k"), ts, body)
	if err := Verify([]byte("k"), ts, sig, body, now.Add(time.Minute), 5*time.Minute); err != nil {
		t.Fatalf("valid signature refused: %v", err)
	}
	for name, c := range map[string]struct {
		secret, ts, sig string
		body            []byte
		now             time.Time
	}{
		"other secret":   {"x", ts, sig, body, now},
		"changed body":   {"k", ts, sig, []byte(`{"event_id":"e2"}`), now},
		"changed time":   {"k", fmt.Sprint(now.Unix() + 1), sig, body, now},
		"replayed later": {"k", ts, sig, body, now.Add(time.Hour)},
		"bad timestamp":  {"k", "yesterday", sig, body, now},
	} {
		if err := Verify([]byte(c.secret), c.ts, c.sig, c.body, c.now, 5*time.Minute); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
