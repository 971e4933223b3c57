package stream

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/internal/stage"
)

// metrics are the stream stage's Prometheus metrics. Counters of outputs
// count committed transactions only (work redone after an abort is counted
// once).
type metrics struct {
	samples      prometheus.Counter
	features     prometheus.Counter
	scores       prometheus.Counter
	alerts       *prometheus.CounterVec
	late         prometheus.Counter
	deadLetters  *prometheus.CounterVec
	transactions prometheus.Counter
	aborts       prometheus.Counter
	restarts     prometheus.Counter
	commitTime   prometheus.Histogram
	restoreTime  prometheus.Histogram
	patients     prometheus.Gauge
	// checkpoints
	statesWritten prometheus.Counter
	replayed      prometheus.Counter
	replaySpan    prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		samples: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_stream_samples_total", Help: "Samples read from the samples topic (committed transactions).",
		}),
		features: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_stream_features_emitted_total", Help: "Feature windows (one per patient per closed window) emitted.",
		}),
		scores: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_stream_scores_emitted_total", Help: "Scores emitted.",
		}),
		alerts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_stream_alerts_emitted_total", Help: "Alert lifecycle events emitted, by type.",
		}, []string{"type"}),
		late: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_stream_late_samples_total", Help: "Samples for windows already closed, sent to the dead-letter topic as too_late.",
		}),
		deadLetters: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_stream_dead_letters_total", Help: "Dead letters written by the stream stage, by reason.",
		}, []string{"reason"}),
		transactions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_stream_transactions_total", Help: "Kafka transactions committed.",
		}),
		aborts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_stream_transactions_aborted_total", Help: "Kafka transactions aborted (their input is processed again).",
		}),
		restarts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_stream_session_restarts_total", Help: "Consumer-group sessions restarted after an error.",
		}),
		commitTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "vigil_stream_commit_duration_seconds", Help: "Time to end a transaction (flush, offsets, EndTxn).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		restoreTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "vigil_stream_restore_duration_seconds", Help: "Time to restore assigned partitions' state from the changelog.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}),
		patients: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vigil_stream_patients", Help: "Patients whose state this processor holds.",
		}),
		statesWritten: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_stream_states_written_total", Help: "Patient states written to the changelog (committed transactions).",
		}),
		replayed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_stream_replayed_records_total", Help: "Input records read again on restore, from a partition's checkpoint to its committed offset.",
		}),
		replaySpan: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "vigil_stream_replay_span_records", Help: "Input records between a restored partition's checkpoint and its committed offset (bounded by about stream.checkpoint_interval of input).",
			Buckets: prometheus.ExponentialBuckets(1, 4, 12),
		}),
	}
	if err := stage.Register(reg, "stream metrics", m.samples, m.features, m.scores, m.alerts, m.late, m.deadLetters,
		m.transactions, m.aborts, m.restarts, m.commitTime, m.restoreTime, m.patients,
		m.statesWritten, m.replayed, m.replaySpan); err != nil {
		return nil, err
	}
	return m, nil
}
