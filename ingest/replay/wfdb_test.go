package replay

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/waveform"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// rrSamples renders the rr_interval samples of batches comparably (value,
// event time, sequence, channel), in topic order.
func rrSamples(t *testing.T, batches []*vigilv1.SampleBatch) []string {
	t.Helper()
	var out []string
	for _, b := range batches {
		for _, s := range b.Samples {
			if s.Metric != waveform.RRMetric {
				t.Fatalf("sample %v", s)
			}
			out = append(out, strings.Join([]string{b.Tenant, b.Patient, b.Device, s.Channel, ftoa(s.Value),
				itoa(s.EventTimeMs), itoa(int64(s.Sequence))}, " "))
		}
	}
	return out
}

// TestReplayWFDBInProcessAndTarget replays MIT-BIH record 100 in process
// (10 s chunks: 181 per lead; waveform processor created by New) into
// broker A, and with Target into a real HTTP server serving
// POST /v1/waveforms on broker B: both yield the same rr_interval samples, from lead MLII only (V5 is the same device's
// second lead), about one per annotated beat.
func TestReplayWFDBInProcessAndTarget(t *testing.T) {
	hea := filepath.Join(testenv.Dataset(t, "mitbih-100"), "100.hea")
	addrA := testenv.Kafka(t)
	r := newReplayer(t, testenv.Config(t, addrA, ""), Options{})
	st, err := r.Run(context.Background(), []string{hea})
	if err != nil {
		t.Fatal(err)
	}
	if st.Files != 1 || st.Samples != 2*650000 || st.Rows != 2*181 || st.Refused != 0 || st.Bytes != 650000*3 {
		t.Errorf("stats %+v", st)
	}
	inProc := decodeBatches(t, addrA)
	for _, b := range inProc {
		if b.Source != vigilv1.Source_SOURCE_REPLAY || b.Tenant != "physionet" || b.Patient != "100" || b.Device != "wfdb" {
			t.Fatalf("batch header %v", b)
		}
	}
	a := rrSamples(t, inProc)
	// 2,273 annotated beats; the last is still pending at the end.
	if len(a) < 2260 || len(a) > 2275 {
		t.Errorf("%d rr_interval samples from record 100", len(a))
	}
	for _, s := range a {
		if !strings.Contains(s, " MLII ") {
			t.Fatalf("sample %q: want lead MLII only", s)
		}
	}

	// Target mode: a running ingest's waveform endpoint.
	addrB := testenv.Kafka(t)
	cfgB := testenv.Config(t, addrB, "")
	deps := stage.Deps{Log: testenv.Logger(t), Metrics: prometheus.NewRegistry()}
	pub, err := publish.New(cfgB, deps)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close(context.Background())
	proc, err := waveform.NewProcessor(pub, waveform.Options{MaxChannels: 10, MaxChunkSamples: 1 << 16}, deps)
	if err != nil {
		t.Fatal(err)
	}
	h, err := waveform.NewHandler(proc, pub, cfgB.HTTP.MaxBodyBytes, 1024, deps)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("POST "+waveform.Path, h)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	rt := newReplayer(t, testenv.Config(t, "", ""), Options{Target: srv.URL})
	st, err = rt.Run(context.Background(), []string{hea})
	if err != nil {
		t.Fatal(err)
	}
	if st.Samples != 2*650000 || st.Refused != 0 {
		t.Errorf("target stats %+v", st)
	}
	viaHTTP := decodeBatches(t, addrB)
	for _, b := range viaHTTP {
		if b.Source != vigilv1.Source_SOURCE_HTTP {
			t.Fatalf("batch source %v", b.Source)
		}
	}
	if bb := rrSamples(t, viaHTTP); !slices.Equal(a, bb) {
		t.Errorf("target mode: %d rr samples, in process %d (first: %v / %v)", len(bb), len(a), bb[:min(1, len(bb))], a[:1])
	}
}

// TestMaxFilesAndPlainProgress replays the real challenge archive with
// MaxFiles 3: exactly three PSV files are read and the rest of the archive
// is not; a plain Progress (not a terminal) writes periodic lines and a
// last "replayed" line.
func TestMaxFilesAndPlainProgress(t *testing.T) {
	addr := testenv.Kafka(t)
	// Run returns after the progress goroutine wrote its last line.
	var buf bytes.Buffer
	r := newReplayer(t, testenv.Config(t, addr, ""), Options{MaxFiles: 3, Progress: NewPlainProgress(&buf, 10*time.Millisecond)})
	st, err := r.Run(context.Background(), []string{tarball(t)})
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(tarball(t))
	if st.Files != 3 || st.Samples == 0 || st.Bytes >= fi.Size()/2 {
		t.Errorf("stats %+v (archive %d bytes)", st, fi.Size())
	}
	patients := map[string]bool{}
	for _, b := range decodeBatches(t, addr) {
		patients[b.Patient] = true
	}
	if len(patients) != 3 {
		t.Errorf("%d patients on the topic, want 3", len(patients))
	}
	out := buf.String()
	last := out[strings.LastIndex(strings.TrimSuffix(out, "\n"), "\n")+1:]
	if !strings.HasPrefix(last, "replay: replayed ") || !strings.Contains(last, "files 3 ") ||
		!strings.Contains(last, "samples "+itoa(st.Samples)+" ") {
		t.Errorf("progress output %q", out)
	}
	if NewProgress(&buf, true) != nil {
		t.Error("quiet progress is not nil")
	}
	if p := NewProgress(&buf, false); p == nil || !p.plain {
		t.Error("progress to a buffer is not plain lines")
	}
}

// TestSpeedPaces replays a PSV file spanning 5 ICU hours at 7200× real
// time: it takes at least 2.5 s; at full speed it does not wait.
func TestSpeedPaces(t *testing.T) {
	dir := t.TempDir()
	psv := "HR|ICULOS\n80|1\n81|2\n82|3\n83|4\n84|5\n85|6\n"
	if err := os.WriteFile(filepath.Join(dir, "p1.psv"), []byte(psv), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := testenv.Kafka(t)
	cfg := testenv.Config(t, addr, "")
	for _, speed := range []float64{7200, 0} {
		r := newReplayer(t, cfg, Options{Speed: speed})
		began := time.Now()
		st, err := r.Run(context.Background(), []string{dir})
		el := time.Since(began)
		if err != nil || st.Samples != 6 {
			t.Fatalf("speed %v: %+v %v", speed, st, err)
		}
		t.Logf("speed %v: %v", speed, el)
		if speed > 0 && el < 2450*time.Millisecond {
			t.Errorf("speed %v: took %v, want >= 2.5 s", speed, el)
		}
		if speed == 0 && el > 2*time.Second {
			t.Errorf("full speed took %v", el)
		}
	}
}
