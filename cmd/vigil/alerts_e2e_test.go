package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/detectors/alerting"
	"github.com/vigilhealth/vigil/detectors/ews"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

// alertRulesE2E is the site's rules file of the lifecycle test: NEWS2
// aggregate >= 5 with a 60 s re-check, resolution after 120 s below 5,
// escalation every 5 min up to tier 2, re-raises suppressed for 60 s after
// an acknowledgement.
const alertRulesE2E = `
name: e2e-site-rules
version: "3"
rules:
  - name: news2_aggregate_ge_5
    score: news2
    raise: 5
    clear: 5
    severities: [{at: 7, severity: high}]
    recheck: 60s
    resolve_after: 120s
    escalate_after: 5m
    max_tier: 2
    suppress_after_ack: 60s
`

// alertWatch follows vigil.alerts.v1 (read-committed) and keeps one
// patient's events in order.
type alertWatch struct {
	t       *testing.T
	cl      *kgo.Client
	patient string
	seen    []*vigilv1.AlertEvent
	keys    []string
}

func newAlertWatch(t *testing.T, broker, topic, patient string) *alertWatch {
	cl, err := kgo.NewClient(kgo.SeedBrokers(broker), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return &alertWatch{t: t, cl: cl, patient: patient}
}

// until polls until an event of the patient with type typ is seen (the
// n-th such, counting from 1) and returns it.
func (w *alertWatch) until(typ vigilv1.AlertEventType, limit time.Duration) *vigilv1.AlertEvent {
	w.t.Helper()
	deadline := time.Now().Add(limit)
	for {
		for _, e := range w.seen {
			if e.Type == typ {
				return e
			}
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("no %s event for %s within %s; seen %v", typ.Label(), w.patient, limit, alertTypes(w.seen))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		fs := w.cl.PollFetches(ctx)
		cancel()
		fs.EachRecord(func(r *kgo.Record) {
			var e vigilv1.AlertEvent
			if err := proto.Unmarshal(r.Value, &e); err != nil {
				w.t.Fatalf("alert record does not decode: %v", err)
			}
			if e.Patient == w.patient {
				w.seen = append(w.seen, &e)
				w.keys = append(w.keys, string(r.Key))
			}
		})
	}
}

func alertTypes(es []*vigilv1.AlertEvent) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.Type.Label()+"/t"+string(rune('0'+e.Tier))+"/"+e.RecheckOutcome)
	}
	return out
}

// vitals are the NEWS2 inputs the test sends: aggregate 10 ("ten": RR 23
// (2), SpO2 93 (2), air (0), SBP 98 (2), pulse 131 (3), alert (0),
// 38.5 °C (1)) or 0 ("well").
var (
	vitalsTen  = map[string]float64{"respiratory_rate": 23, "spo2": 93, "systolic_bp": 98, "heart_rate": 131, "consciousness": 0, "body_temperature": 38.5}
	vitalsWell = map[string]float64{"respiratory_rate": 16, "spo2": 97, "systolic_bp": 120, "heart_rate": 70, "consciousness": 0, "body_temperature": 37}
)

var vitalUnits = map[string]string{"respiratory_rate": "/min", "spo2": "%", "systolic_bp": "mm[Hg]", "heart_rate": "/min",
	"consciousness": "{ACVPU}", "body_temperature": "Cel"}

func postVitals(t *testing.T, base, patient string, at int64, v map[string]float64) {
	t.Helper()
	var samples []jsonSample
	i := int64(0)
	for _, m := range []string{"respiratory_rate", "spo2", "systolic_bp", "heart_rate", "consciousness", "body_temperature"} {
		x, ok := v[m]
		if !ok {
			continue
		}
		samples = append(samples, jsonSample{Metric: m, Value: x, Unit: vitalUnits[m], TimeMs: at + i*100})
		i++
	}
	code, body := postSamples(t, base, map[string]any{"tenant": "st-mary", "patient": patient, "device": "bed-7", "samples": samples})
	if code != http.StatusOK {
		t.Fatalf("posting vitals at %d: %d %s", at, code, body)
	}
}

func getJSON(t *testing.T, url string, into any) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if into != nil && resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(b, into); err != nil {
			t.Fatalf("GET %s: %v: %s", url, err, b)
		}
	}
	return resp.StatusCode
}

func postAck(t *testing.T, base, id, user, note string) (int, string, []byte) {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"user": user, "note": note})
	resp, err := http.Post(base+"/v1/alerts/"+id+"/ack", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("Content-Type"), b
}

// TestAlertLifecycleEndToEnd runs ingest, stream, sink and the alerts API
// in this process against the test broker and ClickHouse, with the stream
// stage and the API on a manual processing clock, and drives one patient's
// NEWS2 alert through its lifecycle with samples posted over HTTP: raised
// after a re-check confirms it, escalated when not acknowledged in time,
// listed by GET /v1/alerts?state=open, acknowledged by POST
// /v1/alerts/{id}/ack, resolved after 120 s below 5, a re-raise inside the
// suppression suppressed, and a second episode re-checked away. It checks
// the events on vigil.alerts.v1 and the rows in ClickHouse.
func TestAlertLifecycleEndToEnd(t *testing.T) {
	brokerAddr, chAddr := testenv.Kafka(t), testenv.ClickHouse(t)
	cfg := testenv.Config(t, brokerAddr, chAddr)
	rules := filepath.Join(t.TempDir(), "rules.yaml")
	if err := os.WriteFile(rules, []byte(alertRulesE2E), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.Alerts.Lifecycle.Rules = rules
	cfg.Alerts.Lifecycle.TimerCheckInterval = 50 * time.Millisecond
	cfg.Alerts.API.AckWait = 20 * time.Second
	cfg.Stream.Windows.IdleTimeout = 0 // windows close by event time only: the clock jumps minutes
	rulesFile, err := alerting.Load(rules)
	if err != nil {
		t.Fatal(err)
	}

	// Event time: minute-aligned, 30 minutes ago; the processing clock
	// of the stream stage and the API starts there too.
	T := time.Now().Add(-30 * time.Minute).Truncate(time.Minute).UnixMilli()
	clk := clock.NewManual(time.UnixMilli(T))
	p := newPlatform(&cliEnv{cfg: cfg, log: testenv.Logger(t), stdout: io.Discard, stderr: io.Discard})
	p.streamClock = clk
	ctx, cancel := context.WithCancel(context.Background())
	if err := p.startInfra(ctx, false); err != nil {
		t.Fatal(err)
	}
	if err := p.addStages(true, true, true); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.runner.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("platform stopped with: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Error("platform did not stop within 60s")
		}
	})
	base := "http://" + p.cfg.HTTP.Listen
	const patient = "p-lifecycle"
	w := newAlertWatch(t, brokerAddr, p.cfg.Kafka.Topics.Alerts, patient)
	s := int64(1000)

	// 1. NEWS2 10: the condition holds, the re-check waits (nothing is
	// notified); RR 25 30 s later (NEWS2 11) confirms it: RAISED.
	postVitals(t, base, patient, T+1*s, vitalsTen)
	postVitals(t, base, patient, T+30*s, map[string]float64{"respiratory_rate": 25})
	raisedEv := w.until(vigilv1.AlertEventType_ALERT_EVENT_RAISED, 60*time.Second)
	if raisedEv.RecheckOutcome != alerting.RecheckConfirmed || raisedEv.EventTimeMs != T+30*s || raisedEv.RaisedEventTimeMs != T+1*s+500 ||
		raisedEv.Severity != "high" || raisedEv.Tier != 0 || raisedEv.Score.GetValue() != 11 {
		t.Errorf("raised: outcome %q at %d (start %d), severity %s, tier %d, score %v; want confirmed at T+30s (start T+1.5s), high, 0, 11",
			raisedEv.RecheckOutcome, raisedEv.EventTimeMs-T, raisedEv.RaisedEventTimeMs-T, raisedEv.Severity, raisedEv.Tier, raisedEv.Score.GetValue())
	}
	if len(w.seen) != 1 {
		t.Errorf("events before the confirmed raise: %v (the pending re-check must not notify)", alertTypes(w.seen))
	}
	id := raisedEv.AlertId

	// 2. Not acknowledged within 5 min (processing time): ESCALATED to
	// tier 1.
	clk.Advance(5 * time.Minute)
	esc := w.until(vigilv1.AlertEventType_ALERT_EVENT_ESCALATED, 30*time.Second)
	if esc.AlertId != id || esc.Tier != 1 || esc.MaxTier != 2 || esc.EmittedTimeMs != T+5*60*s {
		t.Errorf("escalated: alert %s tier %d/%d emitted %d, want %s tier 1/2 at T+5m", esc.AlertId, esc.Tier, esc.MaxTier, esc.EmittedTimeMs-T, id)
	}

	// 3. GET /v1/alerts?state=open lists it at tier 1.
	type listed struct {
		Alerts []alertJSON `json:"alerts"`
		Count  int         `json:"count"`
	}
	var open listed
	deadline := time.Now().Add(30 * time.Second)
	for {
		open = listed{}
		if code := getJSON(t, base+"/v1/alerts?state=open&patient="+patient, &open); code != http.StatusOK {
			t.Fatalf("GET /v1/alerts: %d", code)
		}
		if len(open.Alerts) == 1 && open.Alerts[0].Tier == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(open.Alerts) != 1 || open.Alerts[0].ID != id || open.Alerts[0].State != "open" || open.Alerts[0].Tier != 1 ||
		open.Alerts[0].RulesHash != rulesFile.Hash || open.Alerts[0].RulesetHash != ews.Default().Hash || len(open.Alerts[0].Explanation) == 0 {
		t.Fatalf("open alerts: %+v", open)
	}

	// 4. Acknowledged over HTTP: 200 with the alert once the stream stage
	// applied the command; the escalation stops.
	code, ctype, body := postAck(t, base, id, "nurse.kim", "patient seen, fluids started")
	if code != http.StatusOK {
		t.Fatalf("ack: %d %s", code, body)
	}
	var ackd alertJSON
	if err := json.Unmarshal(body, &ackd); err != nil || ackd.State != "acknowledged" || ackd.AcknowledgedBy != "nurse.kim" || ctype != "application/json" {
		t.Errorf("ack answer %s (%v)", body, err)
	}
	ack := w.until(vigilv1.AlertEventType_ALERT_EVENT_ACKNOWLEDGED, 10*time.Second)
	if ack.AlertId != id || ack.Actor != "nurse.kim" || ack.Note != "patient seen, fluids started" || ack.Tier != 1 ||
		ack.EventTimeMs != T+5*60*s || ack.SuppressedUntilMs != T+6*60*s {
		t.Errorf("acknowledged: %v", ack)
	}
	if code, ctype, body := postAck(t, base, "no-such-alert", "nurse.kim", ""); code != http.StatusNotFound || ctype != "application/problem+json" {
		t.Errorf("ack of an unknown alert: %d %s %s", code, ctype, body)
	}
	clk.Advance(10 * time.Minute) // no escalation once acknowledged (checked below)

	// 5. Below 5 from T+90 s; resolved once that has lasted 120 s.
	postVitals(t, base, patient, T+90*s, vitalsWell)
	for _, at := range []int64{150, 215, 275} {
		postVitals(t, base, patient, T+at*s, map[string]float64{"heart_rate": float64(70 + at%2)})
	}
	res := w.until(vigilv1.AlertEventType_ALERT_EVENT_RESOLVED, 30*time.Second)
	if res.AlertId != id || res.EventTimeMs-(T+90*s+300) < 120*s || res.EventTimeMs > T+275*s+300 || res.Score.GetValue() != 0 {
		t.Errorf("resolved at T+%d ms with score %v, want 120 s after T+90.3 s", res.EventTimeMs-T, res.Score.GetValue())
	}

	// 6. NEWS2 10 again at T+300 s, inside the suppression (until T+360 s):
	// SUPPRESSED, saying why; it clears unnotified.
	postVitals(t, base, patient, T+300*s, vitalsTen)
	sup := w.until(vigilv1.AlertEventType_ALERT_EVENT_SUPPRESSED, 30*time.Second)
	if sup.AlertId == id || !strings.Contains(sup.Reason, "nurse.kim") || sup.SuppressedUntilMs != T+360*s {
		t.Errorf("suppressed: %v", sup)
	}
	postVitals(t, base, patient, T+320*s, vitalsWell)

	// 7. A second episode after the suppression, re-checked away: NEWS2 10
	// at T+400 s, well 20 s later.
	postVitals(t, base, patient, T+400*s, vitalsTen)
	postVitals(t, base, patient, T+420*s, vitalsWell)
	rc := w.until(vigilv1.AlertEventType_ALERT_EVENT_RECHECKED, 30*time.Second)
	if rc.RecheckOutcome != alerting.RecheckCleared || rc.AlertId == id || rc.AlertId == sup.AlertId || rc.RaisedEventTimeMs != T+400*s+500 {
		t.Errorf("rechecked: %v", rc)
	}

	// Every transition is an event on the topic, keyed tenant/patient and
	// carrying its explanation: the score with its components and input
	// times, the NEWS2 ruleset version and hash, the rules file's.
	want := []string{"raised/t0/confirmed", "escalated/t1/", "acknowledged/t1/", "resolved/t1/", "suppressed/t0/", "rechecked/t0/cleared"}
	if got := alertTypes(w.seen); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("events %v, want %v", got, want)
	}
	rs := ews.Default()
	for i, e := range w.seen {
		if w.keys[i] != "st-mary/"+patient {
			t.Errorf("event %d key %q", i, w.keys[i])
		}
		if e.RulesName != "e2e-site-rules" || e.RulesVersion != "3" || e.RulesHash != rulesFile.Hash || e.Ruleset != "news2" ||
			e.RulesetVersion != rs.Version || e.RulesetHash != rs.Hash || e.Source != "score:news2" || e.Reason == "" {
			t.Errorf("event %d (%s) does not name its rules and ruleset: %v", i, e.Type.Label(), e)
		}
		sc := e.Score
		if sc == nil || sc.RulesetHash != rs.Hash || len(sc.Components) < 6 {
			t.Fatalf("event %d (%s) without its score: %v", i, e.Type.Label(), sc)
		}
		for _, c := range sc.Components {
			if !c.Missing && (c.InputTimeMs < T || c.InputTimeMs > sc.EventTimeMs) {
				t.Errorf("event %d: component %s input time T+%d not within the score's inputs", i, c.Parameter, c.InputTimeMs-T)
			}
		}
	}

	// The read model: nothing open; the first alert resolved, with its
	// acknowledgement; acknowledging it again is a conflict.
	open = listed{}
	getJSON(t, base+"/v1/alerts?state=open&patient="+patient, &open)
	if len(open.Alerts) != 0 {
		t.Errorf("open alerts after resolution: %+v", open.Alerts)
	}
	var got alertJSON
	if code := getJSON(t, base+"/v1/alerts/"+id, &got); code != http.StatusOK || got.State != "resolved" || got.AcknowledgedBy != "nurse.kim" || len(got.Events) != 4 {
		t.Errorf("GET /v1/alerts/%s: %d %+v", id, code, got)
	}
	if code, ctype, body := postAck(t, base, id, "nurse.kim", ""); code != http.StatusConflict || ctype != "application/problem+json" {
		t.Errorf("ack of a resolved alert: %d %s %s", code, ctype, body)
	}

	// ClickHouse: one row per event, with the lifecycle columns.
	conn, err := chsink.Open(context.Background(), p.cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if n := waitCount(t, conn, "SELECT count() FROM alerts_final WHERE patient = ?", uint64(len(want)), 60*time.Second, patient); n != uint64(len(want)) {
		t.Fatalf("alert rows in clickhouse: %d, want %d", n, len(want))
	}
	rows, err := conn.Query(context.Background(), `SELECT type, tier, actor, recheck_outcome, rules_version, rules_hash, ruleset_hash,
		state, visitParamExtractString(explanation, 'ruleset_hash') FROM alerts_final WHERE patient = ? ORDER BY emitted_time_ms, event_time_ms`, patient)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var chRows []string
	for rows.Next() {
		var typ, actor, outcome, rv, rh, rsh, state, explHash string
		var tier uint32
		if err := rows.Scan(&typ, &tier, &actor, &outcome, &rv, &rh, &rsh, &state, &explHash); err != nil {
			t.Fatal(err)
		}
		if rv != "3" || rh != rulesFile.Hash || rsh != rs.Hash || explHash != rs.Hash {
			t.Errorf("clickhouse %s row: rules %s %s ruleset %s explanation %s", typ, rv, rh, rsh, explHash)
		}
		chRows = append(chRows, typ+"/"+string(rune('0'+tier))+"/"+actor+"/"+outcome+"/"+state)
	}
	wantRows := []string{"raised/0//confirmed/open", "escalated/1///open", "acknowledged/1/nurse.kim//acknowledged",
		"resolved/1///resolved", "suppressed/0///suppressed", "rechecked/0//cleared/rechecked_away"}
	if strings.Join(chRows, " ") != strings.Join(wantRows, " ") {
		t.Errorf("clickhouse rows\n %v\nwant\n %v", chRows, wantRows)
	}
}

// alertJSON is what the test reads of the API's alert view.
type alertJSON struct {
	ID             string          `json:"id"`
	State          string          `json:"state"`
	Tier           uint32          `json:"tier"`
	AcknowledgedBy string          `json:"acknowledged_by"`
	RulesHash      string          `json:"rules_hash"`
	RulesetHash    string          `json:"ruleset_hash"`
	Explanation    json.RawMessage `json:"explanation"`
	Events         []struct {
		Type string `json:"type"`
	} `json:"events"`
}
