package simulator

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
)

// TestRestartResumesWithoutResendingTime runs the simulator twice into the
// real ingest path with one resume mark, as `vigil run --simulate` does
// across a restart: the second run must not send a device's metric at an
// instant the first run already sent (before, its pre-roll covered that
// time again with other values: samples duplicated in the samples table
// for devices without sequence numbers), and must go on right after it.
func TestRestartResumesWithoutResendingTime(t *testing.T) {
	url, broker, cfg := ingest(t, nil)
	mark := filepath.Join(t.TempDir(), "simulator", "sent.mark")
	run := func() {
		sc := simConfig(url)
		sc.Duration = 2 * time.Second
		sim, err := New(sc, stage.Deps{Log: testenv.Logger(t), Metrics: prometheus.NewRegistry()})
		if err != nil {
			t.Fatal(err)
		}
		defer sim.Close(context.Background())
		sim.ResumeFrom(mark)
		if err := sim.Run(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	run()
	first := consumeSamples(t, broker, cfg)
	if len(first) == 0 {
		t.Fatal("first run sent nothing")
	}
	var lastFirst int64
	for _, s := range first {
		lastFirst = max(lastFirst, s.s.EventTimeMs)
	}
	b, err := os.ReadFile(mark)
	if err != nil {
		t.Fatalf("no resume mark after the first run: %v", err)
	}
	if got, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64); got != lastFirst {
		t.Errorf("resume mark %d, want the first run's latest event time %d", got, lastFirst)
	}
	run()
	// Message ids name their run: the second run's are new.
	firstIDs := map[string]bool{}
	for _, s := range first {
		firstIDs[s.batch.MessageId] = true
	}
	var second []sample
	for _, s := range consumeSamples(t, broker, cfg) {
		if !firstIDs[s.batch.MessageId] {
			second = append(second, s)
		}
	}
	if len(second) == 0 {
		t.Fatal("second run sent nothing")
	}
	type key struct {
		dev, metric string
		at          int64
	}
	seen := map[key]bool{}
	for _, s := range first {
		seen[key{s.batch.Device, s.s.Metric, s.s.EventTimeMs}] = true
	}
	firstOfSecond := int64(1 << 62)
	for _, s := range second {
		k := key{s.batch.Device, s.s.Metric, s.s.EventTimeMs}
		if seen[k] {
			t.Errorf("%s %s at %d sent by both runs", k.dev, k.metric, k.at)
		}
		seen[k] = true
		firstOfSecond = min(firstOfSecond, s.s.EventTimeMs)
	}
	if firstOfSecond != lastFirst+1000 {
		t.Errorf("second run starts at %d, want the second after the first run's last (%d)", firstOfSecond, lastFirst+1000)
	}
}
