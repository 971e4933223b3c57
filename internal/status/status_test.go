package status

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/internal/clock"
)

func TestLineReportsRatesTotalsAndRows(t *testing.T) {
	reg := prometheus.NewRegistry()
	accepted := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_ingest_samples_accepted_total", Help: "x"}, []string{"source"})
	alerts := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_stream_alerts_emitted_total", Help: "x"}, []string{"type"})
	reg.MustRegister(accepted, alerts)
	clk := clock.NewManual(time.Unix(1000, 0))
	r := New(Options{Interval: time.Second, Gatherer: reg, Clock: clk,
		Rows: func(context.Context) (map[string]uint64, error) {
			return map[string]uint64{"samples": 42, "alerts": 1}, nil
		}})
	r.prev, _ = r.counters()
	r.at = clk.Now()
	accepted.WithLabelValues("http").Add(300)
	accepted.WithLabelValues("mllp").Add(100)
	alerts.WithLabelValues("raised").Inc()
	clk.Advance(2 * time.Second)
	line := r.Line(context.Background())
	for _, want := range []string{"in 200 samples/s (400 total)", "alerts 1", "clickhouse rows alerts=1 samples=42"} {
		if !strings.Contains(line, want) {
			t.Errorf("status line %q lacks %q", line, want)
		}
	}
	// The next line's rate covers only what came since.
	clk.Advance(time.Second)
	if line := r.Line(context.Background()); !strings.Contains(line, "in 0 samples/s (400 total)") {
		t.Errorf("second line %q", line)
	}
}
