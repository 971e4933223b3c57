// Package status prints the one-line status `vigil run` shows every few
// seconds: samples/s in, features, scores and alerts emitted, rows in
// ClickHouse, and consumer lag of the stream and sink groups. It reads
// Vigil's own Prometheus registry, so the line and /metrics never disagree.
package status

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"

	"github.com/vigilhealth/vigil/internal/clock"
)

// RowCounter returns the row count per ClickHouse table.
type RowCounter func(ctx context.Context) (map[string]uint64, error)

// Options configure a Reporter.
type Options struct {
	Interval time.Duration
	Gatherer prometheus.Gatherer
	// Admin, when set, is used to report the lag of Groups.
	Admin  *kadm.Client
	Groups []string
	// Rows, when set, reports ClickHouse row counts.
	Rows  RowCounter
	Out   io.Writer
	Log   *slog.Logger
	Clock clock.Clock
}

// Reporter writes a status line every Interval. It is a stage: Run blocks
// until ctx ends.
type Reporter struct {
	o    Options
	prev map[string]float64
	at   time.Time
}

// New returns a Reporter.
func New(o Options) *Reporter {
	if o.Clock == nil {
		o.Clock = clock.System{}
	}
	return &Reporter{o: o}
}

// Run writes lines until ctx ends.
func (r *Reporter) Run(ctx context.Context) error {
	t := time.NewTicker(r.o.Interval)
	defer t.Stop()
	r.prev, _ = r.counters()
	r.at = r.o.Clock.Now()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			fmt.Fprintln(r.o.Out, r.Line(ctx))
		}
	}
}

// Close does nothing; Reporter holds no resources of its own.
func (r *Reporter) Close(context.Context) error { return nil }

// counters sums every counter and gauge of the registry by metric name.
func (r *Reporter) counters() (map[string]float64, error) {
	mfs, err := r.o.Gatherer.Gather()
	if err != nil {
		return nil, fmt.Errorf("gathering metrics: %w", err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch {
			case m.Counter != nil:
				out[mf.GetName()] += m.Counter.GetValue()
			case m.Gauge != nil:
				out[mf.GetName()] += m.Gauge.GetValue()
			}
		}
	}
	return out, nil
}

// Line computes one status line now.
func (r *Reporter) Line(ctx context.Context) string {
	now := r.o.Clock.Now()
	cur, err := r.counters()
	if err != nil {
		return "status: " + err.Error()
	}
	secs := now.Sub(r.at).Seconds()
	rate := func(name string) float64 {
		if secs <= 0 {
			return 0
		}
		return (cur[name] - r.prev[name]) / secs
	}
	var b strings.Builder
	fmt.Fprintf(&b, "status: in %.0f samples/s (%.0f total) | features %.0f | scores %.0f | alerts %.0f",
		rate("vigil_ingest_samples_accepted_total"), cur["vigil_ingest_samples_accepted_total"],
		cur["vigil_stream_features_emitted_total"], cur["vigil_stream_scores_emitted_total"],
		cur["vigil_stream_alerts_emitted_total"])
	if n := cur["vigil_ingest_deadletters_total"]; n > 0 {
		fmt.Fprintf(&b, " | dead letters %.0f", n)
	}
	if r.o.Rows != nil {
		qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		rows, err := r.o.Rows(qctx)
		cancel()
		if err != nil {
			b.WriteString(" | clickhouse: " + err.Error())
		} else {
			names := make([]string, 0, len(rows))
			for n := range rows {
				names = append(names, n)
			}
			sort.Strings(names)
			b.WriteString(" | clickhouse rows")
			for _, n := range names {
				fmt.Fprintf(&b, " %s=%d", n, rows[n])
			}
		}
	}
	if r.o.Admin != nil && len(r.o.Groups) > 0 {
		lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		lags, err := r.o.Admin.Lag(lctx, r.o.Groups...)
		cancel()
		if err != nil {
			b.WriteString(" | lag: " + err.Error())
		} else {
			b.WriteString(" | lag")
			for _, g := range r.o.Groups {
				l, ok := lags[g]
				if !ok || l.Error() != nil {
					fmt.Fprintf(&b, " %s=?", g)
					continue
				}
				fmt.Fprintf(&b, " %s=%d", g, l.Lag.Total())
			}
		}
	}
	r.prev, r.at = cur, now
	return b.String()
}
