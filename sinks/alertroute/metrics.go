package alertroute

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/internal/stage"
)

// metrics are the delivery metrics of the stage (the burden metrics are in
// burden.go). Labels: route is the webhook's configured name.
type metrics struct {
	reg prometheus.Registerer
	all []prometheus.Collector

	events       prometheus.Counter
	undecodable  prometheus.Counter
	deliveries   *prometheus.CounterVec
	retries      *prometheus.CounterVec
	failures     *prometheus.CounterVec
	deadLetters  *prometheus.CounterVec
	overflow     *prometheus.CounterVec
	queued       *prometheus.GaugeVec
	request      *prometheus.HistogramVec
	delivery     *prometheus.HistogramVec
	commits      prometheus.Counter
	commitErrors prometheus.Counter
	fetchErrors  prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		reg: reg,
		events: prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_alertroute_events_total",
			Help: "Alert events read from the alerts topic."}),
		undecodable: prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_alertroute_undecodable_total",
			Help: "Alert-topic records that do not decode as vigil.v1.AlertEvent (dead-lettered, not routed)."}),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_alertroute_deliveries_total",
			Help: "Events finished per route: outcome delivered (2xx) or dead_lettered."}, []string{"route", "outcome"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_alertroute_retries_total",
			Help: "Delivery attempts after the first, per route."}, []string{"route"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_alertroute_failures_total",
			Help: "Failed delivery attempts per route and class (retriable: 5xx, 408, 429, timeout, connection; permanent: other 4xx)."},
			[]string{"route", "class"}),
		deadLetters: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_alertroute_dead_letters_total",
			Help: "Events dead-lettered per route and reason (webhook_failed, webhook_overflow)."}, []string{"route", "reason"}),
		overflow: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_alertroute_overflow_total",
			Help: "Events not queued for a route because its queue stayed full for alerts.routes.queue_wait (dead-lettered)."},
			[]string{"route"}),
		queued: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "vigil_alertroute_queue_length",
			Help: "Events waiting in a route's queue."}, []string{"route"}),
		request: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "vigil_alertroute_request_seconds",
			Help:    "Duration of one webhook HTTP attempt, per route.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}}, []string{"route"}),
		delivery: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "vigil_alertroute_delivery_seconds",
			Help:    "Time from reading an event to its delivery (queueing and retries included), per route.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120}}, []string{"route"}),
		commits: prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_alertroute_commits_total",
			Help: "Kafka offset commits of the alert routes consumer group."}),
		commitErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_alertroute_commit_errors_total",
			Help: "Failed offset commits (retried with the next commit)."}),
		fetchErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_alertroute_fetch_errors_total",
			Help: "Kafka fetch errors of the alert routes consumer."}),
	}
	m.all = []prometheus.Collector{m.events, m.undecodable, m.deliveries, m.retries, m.failures, m.deadLetters,
		m.overflow, m.queued, m.request, m.delivery, m.commits, m.commitErrors, m.fetchErrors}
	if err := stage.Register(reg, "alert route metrics", m.all...); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *metrics) unregister() {
	for _, c := range m.all {
		m.reg.Unregister(c)
	}
}
