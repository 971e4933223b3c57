package chsink

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/internal/stage"
)

// metrics are the sink's Prometheus collectors, registered on the
// registerer passed in stage.Deps (never a global one).
type metrics struct {
	reg           prometheus.Registerer
	rowsInserted  *prometheus.CounterVec
	batches       *prometheus.CounterVec
	insertSeconds *prometheus.HistogramVec
	retries       *prometheus.CounterVec
	rejected      *prometheus.CounterVec
	buffered      *prometheus.GaugeVec
	commits       prometheus.Counter
	commitErrors  prometheus.Counter
	fetchErrors   prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		reg: reg,
		rowsInserted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_sink_rows_inserted_total",
			Help: "Rows ClickHouse accepted, per table (a row re-inserted after a retry or restart counts again).",
		}, []string{"table"}),
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_sink_batches_total",
			Help: "Insert batches ClickHouse accepted, per table.",
		}, []string{"table"}),
		insertSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vigil_sink_insert_seconds",
			Help:    "Duration of accepted insert batches (prepare, append, send), per table.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 12),
		}, []string{"table"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_sink_retries_total",
			Help: "Insert attempts that failed with a retriable error and were retried, per table.",
		}, []string{"table"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_sink_rejected_total",
			Help: "Records that could not be stored (undecodable, or refused by ClickHouse) and were dead-lettered with reason sink_rejected, per table.",
		}, []string{"table"}),
		buffered: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vigil_sink_buffered_rows",
			Help: "Rows read from Kafka and waiting in the current batch, per table.",
		}, []string{"table"}),
		commits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_sink_offset_commits_total",
			Help: "Kafka offset commits made after ClickHouse accepted the rows.",
		}),
		commitErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_sink_offset_commit_errors_total",
			Help: "Kafka offset commits that failed (retried with the next commit).",
		}),
		fetchErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_sink_fetch_errors_total",
			Help: "Errors reported by Kafka fetches.",
		}),
	}
	for _, t := range Tables() {
		m.rowsInserted.WithLabelValues(t)
		m.batches.WithLabelValues(t)
		m.retries.WithLabelValues(t)
		m.rejected.WithLabelValues(t)
		m.buffered.WithLabelValues(t)
	}
	if err := stage.Register(reg, "sink metrics", m.collectors()...); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.rowsInserted, m.batches, m.insertSeconds, m.retries, m.rejected,
		m.buffered, m.commits, m.commitErrors, m.fetchErrors}
}

func (m *metrics) unregister() {
	for _, c := range m.collectors() {
		m.reg.Unregister(c)
	}
}
