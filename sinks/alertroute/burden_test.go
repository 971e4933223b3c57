package alertroute

import (
	"context"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

// burdenDay is one day of a ward's alerts: ward ICU1 (beds 01, 02), rule
// news2_high, plus one alert in ICU2.
type burdenCase struct {
	evs []*vigilv1.AlertEvent
	// acks are the acknowledged alerts' delays (s) from RAISED, in ICU1.
	acks []float64
}

func burdenFixture(t0 int64) burdenCase {
	const m = 60_000
	const r = "news2_high"
	evs := []*vigilv1.AlertEvent{
		// a1: raised, acknowledged after 60 s, resolved.
		event("a1-r", "a1", raised, r, "high", "ICU1^01", t0),
		event("a1-a", "a1", acked, r, "high", "ICU1^01", t0+1*m),
		event("a1-x", "a1", resolv, r, "high", "ICU1^01", t0+10*m),
		// a2: raised, escalated, acknowledged after 600 s.
		event("a2-r", "a2", raised, r, "high", "ICU1^01", t0+60*m),
		event("a2-e", "a2", escal, r, "high", "ICU1^01", t0+65*m),
		event("a2-a", "a2", acked, r, "high", "ICU1^01", t0+70*m),
		// a3: raised in bed 02, never acknowledged.
		event("a3-r", "a3", raised, r, "high", "ICU1^02", t0+120*m),
		// a4: re-checked away (never raised).
		event("a4-c", "a4", recheck, r, "high", "ICU1^02", t0+180*m),
		// a5: suppressed after an acknowledgement.
		event("a5-s", "a5", suppr, r, "high", "ICU1^02", t0+240*m),
		// a7: raised after a confirming re-check, acknowledged after 300 s.
		event("a7-r", "a7", raised, r, "high", "ICU1^01", t0+300*m),
		event("a7-a", "a7", acked, r, "high", "ICU1^01", t0+305*m),
		// Another ward and rule: raised, acknowledged after 120 s.
		event("a6-r", "a6", raised, "qsofa_ge_2", "medium", "ICU2^05", t0+30*m),
		event("a6-a", "a6", acked, "qsofa_ge_2", "medium", "ICU2^05", t0+32*m),
	}
	for _, ev := range evs {
		switch ev.Type {
		case recheck:
			ev.RecheckOutcome, ev.State = "cleared", "rechecked_away"
		case acked:
			ev.AcknowledgedBy, ev.AcknowledgedTimeMs, ev.Actor = "nurse.kim", ev.EventTimeMs, "nurse.kim"
		}
	}
	// The RAISED of a7 came after a re-check: its alert started earlier.
	evs[9].RecheckOutcome = "confirmed"
	for _, ev := range evs[9:11] {
		ev.RaisedEventTimeMs = t0 + 299*m
	}
	return burdenCase{evs: evs, acks: []float64{60, 600, 300}}
}

func TestBurdenMetricsAndClickHouseViews(t *testing.T) {
	broker := testenv.Kafka(t)
	ch := testenv.ClickHouse(t)
	cfg := testenv.Config(t, broker, ch)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := chsink.Migrate(ctx, cfg.ClickHouse, testenv.Logger(t)); err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 11, 23, 6, 0, 0, 0, time.UTC).UnixMilli()
	fx := burdenFixture(t0)
	produce(t, cfg, fx.evs...)

	// The ClickHouse sink stores the events (alert rows are its mapping).
	sink, err := chsink.New(cfg, stage.Deps{Log: testenv.Logger(t), Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	sctx, stopSink := context.WithCancel(context.Background())
	sinkDone := make(chan error, 1)
	go func() { sinkDone <- sink.Run(sctx) }()
	defer func() {
		stopSink()
		<-sinkDone
		_ = sink.Close(context.Background())
	}()

	r := start(t, cfg)
	ward1 := map[string]string{"rule": "news2_high", "ward": "ICU1"}
	waitFor(t, "the burden metrics to count every event", 30*time.Second, func() bool {
		v, _ := metric(t, r.reg, "vigil_alertroute_events_total", nil)
		return v == float64(len(fx.evs))
	})
	for name, want := range map[string]float64{
		"vigil_alert_burden_raised_total":        4,
		"vigil_alert_burden_acknowledged_total":  3,
		"vigil_alert_burden_escalated_total":     1,
		"vigil_alert_burden_suppressed_total":    1,
		"vigil_alert_burden_resolved_total":      1,
		"vigil_alert_burden_time_to_ack_seconds": float64(len(fx.acks)),
	} {
		if got, ok := metric(t, r.reg, name, ward1); !ok || got != want {
			t.Errorf("%s%v = %v (present %v), want %v", name, ward1, got, ok, want)
		}
	}
	sumAcks := 0.0
	for _, a := range fx.acks {
		sumAcks += a
	}
	if got := histogramSum(t, r.reg, "vigil_alert_burden_time_to_ack_seconds", ward1); got != sumAcks {
		t.Errorf("time to ack sum %v, want %v (from the RAISED events, not the alerts' start)", got, sumAcks)
	}
	if got, _ := metric(t, r.reg, "vigil_alert_burden_rechecked_total", map[string]string{"rule": "news2_high", "ward": "ICU1", "outcome": "cleared"}); got != 1 {
		t.Errorf("re-checked away %v, want 1", got)
	}
	if got, _ := metric(t, r.reg, "vigil_alert_burden_raised_total", map[string]string{"rule": "qsofa_ge_2", "ward": "ICU2"}); got != 1 {
		t.Errorf("ICU2 raised %v, want 1", got)
	}
	for name, want := range map[string]float64{
		"vigil_alert_burden_alerts_per_bed_day":   4.0 / 2, // 4 raised over 2 beds in the day
		"vigil_alert_burden_beds":                 2,
		"vigil_alert_burden_raised_window":        4,
		"vigil_alert_burden_rechecked_away_ratio": 1.0 / 5,
	} {
		if got, _ := metric(t, r.reg, name, map[string]string{"ward": "ICU1"}); math.Abs(got-want) > 1e-9 {
			t.Errorf("%s{ward=ICU1} = %v, want %v", name, got, want)
		}
	}

	// The same figures from the ClickHouse views.
	conn, err := chsink.Open(ctx, cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	waitFor(t, "the alert rows in ClickHouse", 60*time.Second, func() bool {
		var n uint64
		err := conn.QueryRow(ctx, "SELECT count() FROM alerts_final").Scan(&n)
		return err == nil && n == uint64(len(fx.evs))
	})
	type row struct {
		day                                       time.Time
		raised, beds, acked, rechecked, esc, supp uint64
		perBed, median, p90, share                float64
	}
	var got row
	q := `SELECT day, alerts_raised, beds, alerts_per_bed_day, acknowledged, median_time_to_ack_s, p90_time_to_ack_s,
		rechecked_away, share_rechecked_away, escalations, suppressed
		FROM alert_burden_daily WHERE tenant = 't1' AND ward = 'ICU1' AND rule = 'news2_high'`
	if err := conn.QueryRow(ctx, q).Scan(&got.day, &got.raised, &got.beds, &got.perBed, &got.acked, &got.median, &got.p90,
		&got.rechecked, &got.share, &got.esc, &got.supp); err != nil {
		t.Fatalf("querying alert_burden_daily: %v", err)
	}
	want := row{day: time.Date(2026, 11, 23, 0, 0, 0, 0, time.UTC), raised: 4, beds: 2, perBed: 2, acked: 3,
		median: 300, p90: 600, rechecked: 1, share: 0.2, esc: 1, supp: 1}
	if got.day.Format(time.DateOnly) != want.day.Format(time.DateOnly) {
		t.Errorf("day %s, want %s", got.day.Format(time.DateOnly), want.day.Format(time.DateOnly))
	}
	got.day = want.day
	if fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", want) {
		t.Errorf("alert_burden_daily ICU1/news2_high\n got %+v\nwant %+v", got, want)
	}
	var wardRaised, wardBeds uint64
	var wardPerBed float64
	if err := conn.QueryRow(ctx, `SELECT sum(alerts_raised), sum(beds), sum(alerts_per_bed_day) FROM alert_burden_ward_daily WHERE tenant = 't1' AND ward = 'ICU2'`).
		Scan(&wardRaised, &wardBeds, &wardPerBed); err != nil {
		t.Fatalf("querying alert_burden_ward_daily: %v", err)
	}
	if wardRaised != 1 || wardBeds != 1 || wardPerBed != 1 {
		t.Errorf("ICU2 ward day: raised %d beds %d per bed %v, want 1 1 1", wardRaised, wardBeds, wardPerBed)
	}
}

// TestBurdenWindowSlides checks the trailing window and the bounds without
// Kafka: alerts older than the window leave the gauges, and wards beyond
// max_wards count under _other.
func TestBurdenWindowSlides(t *testing.T) {
	rc := config.Default().Alerts.Routes
	rc.MaxWards = 2
	reg := prometheus.NewRegistry()
	b, err := NewBurden(rc, reg)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 11, 23, 0, 0, 0, 0, time.UTC).UnixMilli()
	h := time.Hour.Milliseconds()
	b.Observe(event("1", "a1", raised, "r", "high", "W1^01", t0))
	b.Observe(event("2", "a2", raised, "r", "high", "W1^02", t0+2*h))
	b.Observe(event("3", "a3", raised, "r", "high", "W1^02", t0+3*h))
	if f := b.Wards()["W1"]; f.Raised != 3 || f.Beds != 2 || f.PerBedDay != 1.5 {
		t.Errorf("day one: %+v", f)
	}
	// A day later only the alerts of the last 24 h count.
	b.Observe(event("4", "a4", raised, "r", "high", "W1^03", t0+26*h))
	if f := b.Wards()["W1"]; f.Raised != 2 || f.Beds != 2 || f.PerBedDay != 1 {
		t.Errorf("after the window slid: %+v, want the alerts at +3h and +26h over beds 02 and 03", f)
	}
	b.Observe(event("5", "a5", raised, "r", "high", "W2^01", t0+26*h))
	b.Observe(event("6", "a6", raised, "r", "high", "W3^01", t0+26*h))
	if _, ok := metric(t, reg, "vigil_alert_burden_raised_total", map[string]string{"rule": "r", "ward": "_other"}); !ok {
		t.Error("a third ward beyond max_wards 2 did not count under _other")
	}
	if _, ok := metric(t, reg, "vigil_alert_burden_raised_total", map[string]string{"rule": "r", "ward": "W3"}); ok {
		t.Error("ward W3 got its own series beyond max_wards")
	}
}
