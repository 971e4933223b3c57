package alertroute

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Label values of the burden metrics for what has none or is beyond the
// configured bounds.
const (
	labelUnknown = "unknown"
	labelOther   = "_other"
)

// burdenBuckets is how many buckets the trailing window is cut into for
// the per-ward gauges (so the window slides by window/burdenBuckets).
const burdenBuckets = 96

// maxOpenAlerts bounds the RAISED times remembered for time to
// acknowledge (one entry per open alert); beyond it an acknowledgement
// falls back to the event's raised_event_time_ms.
const maxOpenAlerts = 1 << 16

// Burden turns alert lifecycle events into the alert-burden metrics a
// site tunes thresholds against, per rule and ward:
//
//   - vigil_alert_burden_raised_total, _acknowledged_total,
//     _escalated_total, _suppressed_total, _resolved_total{rule,ward};
//   - vigil_alert_burden_rechecked_total{rule,ward,outcome}: RECHECKED
//     events, outcome "cleared" = re-checked away (never notified); the
//     share re-checked away is cleared / (cleared + raised);
//   - vigil_alert_burden_time_to_ack_seconds{rule,ward}: from the alert's
//     RAISED event (its event time) to the acknowledgement time;
//   - per ward over the trailing alerts.routes.burden_window (ending at the
//     newest event time seen, so a replay gives the same figures):
//     vigil_alert_burden_alerts_per_bed_day (raised alerts / distinct
//     locations that had one, scaled to a day), _beds, _raised_window and
//     _rechecked_away_ratio. Beds without any alert are not on the alerts
//     topic, so the per-bed figure is per alerting bed.
//
// State is bounded: at most max_wards wards and max_rules rules get their
// own series (others count under "_other"), max_beds_per_ward locations
// per ward (others counted in vigil_alert_burden_untracked_beds_total), and
// maxOpenAlerts open alerts. Events read twice (a redelivery after a
// rebalance) are counted twice. Burden is safe for concurrent use.
type Burden struct {
	reg      prometheus.Registerer
	all      []prometheus.Collector
	window   int64 // ms
	bucketMs int64
	maxWards int
	maxRules int
	maxBeds  int

	raised, acked, escalated, suppressed, resolved *prometheus.CounterVec
	rechecked                                      *prometheus.CounterVec
	tta                                            *prometheus.HistogramVec
	untracked                                      prometheus.Counter

	mu       sync.Mutex
	wards    map[string]*wardBurden
	rules    map[string]bool
	raisedAt map[string]int64 // alert_id -> event time of its RAISED event
	newestMs int64

	perBed, beds, raisedWindow, recheckedAway *prometheus.Desc
}

// wardBurden is one ward's trailing-window state.
type wardBurden struct {
	beds    map[string]int64 // location -> newest RAISED event time
	buckets [burdenBuckets]burdenBucket
}

type burdenBucket struct {
	slot             int64 // event time / bucketMs; stale when older than the window
	raised, rechecks int
}

// NewBurden registers the burden metrics on reg (all or none).
func NewBurden(rc config.AlertsRoutes, reg prometheus.Registerer) (*Burden, error) {
	rw := []string{"rule", "ward"}
	counter := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_alert_burden_" + name, Help: help}, rw)
	}
	b := &Burden{
		reg: reg, window: rc.BurdenWindow.Milliseconds(), maxWards: rc.MaxWards, maxRules: rc.MaxRules, maxBeds: rc.MaxBedsPerWard,
		raised:     counter("raised_total", "Alerts raised (notified), per rule and ward."),
		acked:      counter("acknowledged_total", "Alerts acknowledged, per rule and ward."),
		escalated:  counter("escalated_total", "Escalations to a next tier, per rule and ward."),
		suppressed: counter("suppressed_total", "Alerts suppressed after an acknowledgement, per rule and ward."),
		resolved:   counter("resolved_total", "Alerts resolved, per rule and ward."),
		rechecked: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_alert_burden_rechecked_total",
			Help: "RECHECKED events per rule, ward and outcome (cleared: re-checked away, never notified)."},
			[]string{"rule", "ward", "outcome"}),
		tta: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "vigil_alert_burden_time_to_ack_seconds",
			Help:    "Time from an alert's RAISED event to its acknowledgement (event times), per rule and ward.",
			Buckets: []float64{15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400}}, rw),
		untracked: prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_alert_burden_untracked_beds_total",
			Help: "Raised alerts whose location was not tracked because its ward already had alerts.routes.max_beds_per_ward locations."}),
		wards:    map[string]*wardBurden{},
		rules:    map[string]bool{},
		raisedAt: map[string]int64{},
		perBed: prometheus.NewDesc("vigil_alert_burden_alerts_per_bed_day",
			"Raised alerts per alerting bed per day in the trailing burden window, per ward.", []string{"ward"}, nil),
		beds: prometheus.NewDesc("vigil_alert_burden_beds",
			"Distinct locations with a raised alert in the trailing burden window, per ward.", []string{"ward"}, nil),
		raisedWindow: prometheus.NewDesc("vigil_alert_burden_raised_window",
			"Alerts raised in the trailing burden window, per ward.", []string{"ward"}, nil),
		recheckedAway: prometheus.NewDesc("vigil_alert_burden_rechecked_away_ratio",
			"Share of candidate alerts re-checked away (cleared / (cleared + raised)) in the trailing burden window, per ward.", []string{"ward"}, nil),
	}
	b.bucketMs = max(b.window/burdenBuckets, 1)
	b.all = []prometheus.Collector{b.raised, b.acked, b.escalated, b.suppressed, b.resolved, b.rechecked, b.tta, b.untracked, burdenGauges{b}}
	if err := stage.Register(reg, "alert burden metrics", b.all...); err != nil {
		return nil, err
	}
	return b, nil
}

func (b *Burden) unregister() {
	for _, c := range b.all {
		b.reg.Unregister(c)
	}
}

// labels maps the event's rule and ward onto bounded label values. Called
// with b.mu held.
func (b *Burden) labels(ev *vigilv1.AlertEvent) (rule, ward string) {
	rule, ward = ev.GetRule(), ev.GetWard()
	if rule == "" {
		rule = labelUnknown
	}
	if ward == "" {
		ward = labelUnknown
	}
	if !b.rules[rule] {
		if len(b.rules) >= b.maxRules {
			rule = labelOther
		} else {
			b.rules[rule] = true
		}
	}
	if b.wards[ward] == nil {
		if len(b.wards) >= b.maxWards {
			ward = labelOther
		}
		if b.wards[ward] == nil {
			b.wards[ward] = &wardBurden{beds: map[string]int64{}}
		}
	}
	return rule, ward
}

// Observe counts one lifecycle event.
func (b *Burden) Observe(ev *vigilv1.AlertEvent) {
	b.mu.Lock()
	defer b.mu.Unlock()
	rule, ward := b.labels(ev)
	at := ev.GetEventTimeMs()
	b.newestMs = max(b.newestMs, at)
	w := b.wards[ward]
	switch ev.GetType() {
	case vigilv1.AlertEventType_ALERT_EVENT_RAISED:
		b.raised.WithLabelValues(rule, ward).Inc()
		b.bucket(w, at).raised++
		loc := ev.GetLocation()
		if loc == "" {
			loc = labelUnknown
		}
		if _, ok := w.beds[loc]; ok || len(w.beds) < b.maxBeds || b.pruneBeds(w) {
			w.beds[loc] = max(w.beds[loc], at)
		} else {
			b.untracked.Inc()
		}
		b.rememberRaised(ev.GetAlertId(), at)
	case vigilv1.AlertEventType_ALERT_EVENT_RECHECKED:
		outcome := ev.GetRecheckOutcome()
		if outcome == "" {
			outcome = labelUnknown
		}
		b.rechecked.WithLabelValues(rule, ward, outcome).Inc()
		if outcome == "cleared" {
			b.bucket(w, at).rechecks++
		}
	case vigilv1.AlertEventType_ALERT_EVENT_ACKNOWLEDGED:
		b.acked.WithLabelValues(rule, ward).Inc()
		ackMs := ev.GetAcknowledgedTimeMs()
		if ackMs == 0 {
			ackMs = at
		}
		raisedMs, ok := b.raisedAt[ev.GetAlertId()]
		if !ok {
			raisedMs = ev.GetRaisedEventTimeMs()
		}
		if raisedMs > 0 && ackMs >= raisedMs {
			b.tta.WithLabelValues(rule, ward).Observe(float64(ackMs-raisedMs) / 1000)
		}
		delete(b.raisedAt, ev.GetAlertId())
	case vigilv1.AlertEventType_ALERT_EVENT_ESCALATED:
		b.escalated.WithLabelValues(rule, ward).Inc()
	case vigilv1.AlertEventType_ALERT_EVENT_SUPPRESSED:
		b.suppressed.WithLabelValues(rule, ward).Inc()
	case vigilv1.AlertEventType_ALERT_EVENT_RESOLVED:
		b.resolved.WithLabelValues(rule, ward).Inc()
		delete(b.raisedAt, ev.GetAlertId())
	}
}

// bucket returns w's bucket of event time at, reset when it held an older
// slot. Called with b.mu held.
func (b *Burden) bucket(w *wardBurden, at int64) *burdenBucket {
	slot := at / b.bucketMs
	bk := &w.buckets[slot%burdenBuckets]
	if bk.slot != slot {
		if bk.slot > slot { // older than what the ring holds: count it nowhere
			return &burdenBucket{}
		}
		*bk = burdenBucket{slot: slot}
	}
	return bk
}

// pruneBeds drops w's locations older than the window and reports whether
// there is room now. Called with b.mu held.
func (b *Burden) pruneBeds(w *wardBurden) bool {
	for loc, t := range w.beds {
		if t <= b.newestMs-b.window {
			delete(w.beds, loc)
		}
	}
	return len(w.beds) < b.maxBeds
}

func (b *Burden) rememberRaised(id string, at int64) {
	if _, ok := b.raisedAt[id]; !ok && len(b.raisedAt) >= maxOpenAlerts {
		for k, t := range b.raisedAt {
			if t <= b.newestMs-7*b.window {
				delete(b.raisedAt, k)
			}
		}
		if len(b.raisedAt) >= maxOpenAlerts {
			return
		}
	}
	b.raisedAt[id] = at
}

// WardFigures are one ward's trailing-window figures.
type WardFigures struct {
	// Raised is the alerts raised, Beds the distinct locations with one.
	Raised, Beds int
	// Rechecked is the candidate alerts re-checked away.
	Rechecked int
	// PerBedDay is Raised / Beds scaled to a day; RecheckedAway is
	// Rechecked / (Rechecked + Raised).
	PerBedDay, RecheckedAway float64
}

// Wards returns every ward's trailing-window figures (the window ends at
// the newest event time seen).
func (b *Burden) Wards() map[string]WardFigures {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make(map[string]WardFigures, len(b.wards))
	from := b.newestMs - b.window // exclusive
	for name, w := range b.wards {
		var f WardFigures
		for i := range w.buckets {
			bk := &w.buckets[i]
			// A bucket counts when its whole slot is in the window.
			if bk.slot*b.bucketMs > from {
				f.Raised += bk.raised
				f.Rechecked += bk.rechecks
			}
		}
		for _, t := range w.beds {
			if t > from {
				f.Beds++
			}
		}
		if f.Beds > 0 {
			f.PerBedDay = float64(f.Raised) / float64(f.Beds) * float64(24*time.Hour.Milliseconds()) / float64(b.window)
		}
		if f.Raised+f.Rechecked > 0 {
			f.RecheckedAway = float64(f.Rechecked) / float64(f.Raised+f.Rechecked)
		}
		out[name] = f
	}
	return out
}

// burdenGauges is the collector of the per-ward window gauges, computed at
// scrape time.
type burdenGauges struct{ b *Burden }

func (g burdenGauges) Describe(ch chan<- *prometheus.Desc) {
	ch <- g.b.perBed
	ch <- g.b.beds
	ch <- g.b.raisedWindow
	ch <- g.b.recheckedAway
}

func (g burdenGauges) Collect(ch chan<- prometheus.Metric) {
	for ward, f := range g.b.Wards() {
		ch <- prometheus.MustNewConstMetric(g.b.perBed, prometheus.GaugeValue, f.PerBedDay, ward)
		ch <- prometheus.MustNewConstMetric(g.b.beds, prometheus.GaugeValue, float64(f.Beds), ward)
		ch <- prometheus.MustNewConstMetric(g.b.raisedWindow, prometheus.GaugeValue, float64(f.Raised), ward)
		ch <- prometheus.MustNewConstMetric(g.b.recheckedAway, prometheus.GaugeValue, f.RecheckedAway, ward)
	}
}
