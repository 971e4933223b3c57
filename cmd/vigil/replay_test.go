package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/features/hrv"
	"github.com/vigilhealth/vigil/ingest/replay"
	"github.com/vigilhealth/vigil/ingest/wfdb"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// TestReplayCommand runs `vigil replay` through the CLI entry on a PSV
// folder into a real broker (topics created by the command), and checks the
// summary (per file 7 + 3 vital cells = 10 samples) and the samples topic.
func TestReplayCommand(t *testing.T) {
	dir := t.TempDir()
	psv := "HR|O2Sat|Temp|SBP|MAP|DBP|Resp|EtCO2|FiO2|ICULOS|SepsisLabel\n" +
		"80|97|37|120|90|70|16|NaN|NaN|1|0\n" +
		"82|96|NaN|NaN|NaN|NaN|18|NaN|NaN|2|0\n"
	for _, p := range []string{"p1", "p2"} {
		if err := os.WriteFile(filepath.Join(dir, p+".psv"), []byte(psv), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	addr := testenv.Kafka(t)
	var out, errOut syncBuffer
	code := realMain([]string{"replay", "--brokers", addr, "--data-dir", t.TempDir(), "--quiet", "--tenant", "ward-9", dir},
		nil, &out, &errOut)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	if !strings.Contains(out.String(), "replayed 2 files, 4 rows: 20 samples accepted in 4 batches, 0 refused") {
		t.Errorf("summary: %s", out.String())
	}
	recs := testenv.ReadAll(t, addr, "vigil.samples.v1")
	if len(recs) != 4 || !strings.HasPrefix(string(recs[0].Key), "ward-9/p") {
		t.Errorf("%d records on vigil.samples.v1", len(recs))
	}
	// No input is a usage mistake, reported as such.
	out.Reset()
	errOut.Reset()
	if code := realMain([]string{"replay", "--brokers", addr, "--quiet"}, nil, &out, &errOut); code == 0 ||
		!strings.Contains(errOut.String(), "name the files or folders") {
		t.Errorf("no input: exit %d, %s", code, errOut.String())
	}
}

// replaySummary is the counts `vigil replay` prints.
type replaySummary struct{ files, rows, samples, batches, refused int64 }

var summaryRE = regexp.MustCompile(`replayed (\d+) files, (\d+) rows: (\d+) samples accepted in (\d+) batches, (\d+) refused`)

// vigilReplay runs `vigil replay` (the CLI entry, as a user would) into the
// broker at addr and returns its summary and standard error.
func vigilReplay(t *testing.T, addr string, args ...string) (replaySummary, string) {
	t.Helper()
	// stderr takes the log and the progress lines from different
	// goroutines, as an *os.File would.
	var out, errOut syncBuffer
	full := append([]string{"replay", "--brokers", addr, "--data-dir", t.TempDir()}, args...)
	if code := realMain(full, nil, &out, &errOut); code != 0 {
		t.Fatalf("vigil %s: exit %d: %s", strings.Join(full, " "), code, errOut.String())
	}
	m := summaryRE.FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("vigil replay printed %q", out.String())
	}
	n := func(i int) int64 { v, _ := strconv.ParseInt(m[i], 10, 64); return v }
	return replaySummary{n(1), n(2), n(3), n(4), n(5)}, errOut.String()
}

// startStreamStage runs the stream stage of a platform (as `vigil stream`
// does) on the broker at addr until the test ends.
func startStreamStage(t *testing.T, addr string) config.Config {
	t.Helper()
	cfg := testenv.Config(t, addr, "")
	p := newPlatform(&cliEnv{cfg: cfg, log: testenv.Logger(t), stdout: io.Discard, stderr: io.Discard})
	if err := p.addStages(false, true, false); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.runner.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("stream stage stopped with: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Error("stream stage did not stop within 60s")
		}
	})
	return cfg
}

// waitStreamCaughtUp waits until the stream group has committed every
// record of the samples topic: what they produced is then committed too.
func waitStreamCaughtUp(t *testing.T, addr string, cfg config.Config) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	deadline := time.Now().Add(90 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ends, err1 := adm.ListEndOffsets(ctx, cfg.Kafka.Topics.Samples)
		offs, err2 := adm.FetchOffsets(ctx, cfg.Stream.Group)
		cancel()
		behind := int64(0)
		if err := errors.Join(err1, err2); err == nil {
			ends.Each(func(o kadm.ListedOffset) {
				c, _ := offs.Lookup(o.Topic, o.Partition)
				behind += o.Offset - max(c.At, 0)
			})
			if behind == 0 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream still %d records behind on %s (%v %v)", behind, cfg.Kafka.Topics.Samples, err1, err2)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// features reads the features topic: windows by key, and each window as
// canonical JSON with emitted_time_ms cleared, sorted.
func features(t *testing.T, addr string, cfg config.Config) (map[string][]*vigilv1.FeatureWindow, []string) {
	t.Helper()
	by := map[string][]*vigilv1.FeatureWindow{}
	var canon []string
	for _, r := range testenv.ReadAll(t, addr, cfg.Kafka.Topics.Features) {
		fw := &vigilv1.FeatureWindow{}
		if err := proto.Unmarshal(r.Value, fw); err != nil {
			t.Fatal(err)
		}
		by[string(r.Key)] = append(by[string(r.Key)], fw)
		c := proto.Clone(fw)
		clearProcessingTime(c.ProtoReflect())
		js, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		canon = append(canon, string(r.Key)+" "+string(js))
	}
	slices.Sort(canon)
	return by, canon
}

func batchesByKey(t *testing.T, addr string, cfg config.Config) map[string][]*vigilv1.SampleBatch {
	t.Helper()
	out := map[string][]*vigilv1.SampleBatch{}
	for _, r := range testenv.ReadAll(t, addr, cfg.Kafka.Topics.Samples) {
		b := &vigilv1.SampleBatch{}
		if err := proto.Unmarshal(r.Value, b); err != nil {
			t.Fatal(err)
		}
		if string(r.Key) != b.Tenant+"/"+b.Patient {
			t.Fatalf("record key %q for a batch of %s/%s", r.Key, b.Tenant, b.Patient)
		}
		out[string(r.Key)] = append(out[string(r.Key)], b)
	}
	return out
}

func featureOf(fw *vigilv1.FeatureWindow, metric string) *vigilv1.Feature {
	for _, f := range fw.Features {
		if f.Metric == metric && !f.DerivedMetric {
			return f
		}
	}
	return nil
}

// psvHeartRates reads the first n PSV entries of the challenge tarball
// independently of the replayer and returns, per patient (file stem), the
// HR cell of each ICU hour (ICULOS) that has one.
func psvHeartRates(t *testing.T, tgz string, n int) map[string]map[int64]float64 {
	t.Helper()
	f, err := os.Open(tgz)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(gz)
	out := map[string]map[int64]float64{}
	for len(out) < n {
		h, err := tr.Next()
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag != tar.TypeReg || !strings.HasSuffix(h.Name, ".psv") {
			continue
		}
		stem := strings.TrimSuffix(filepath.Base(h.Name), ".psv")
		hr := map[int64]float64{}
		sc := bufio.NewScanner(tr)
		var head []string
		for sc.Scan() {
			cells := strings.Split(sc.Text(), "|")
			if head == nil {
				head = cells
				continue
			}
			var v, hour float64 = math.NaN(), math.NaN()
			for i, c := range cells {
				switch head[i] {
				case "HR":
					v, _ = strconv.ParseFloat(c, 64)
				case "ICULOS":
					hour, _ = strconv.ParseFloat(c, 64)
				}
			}
			if !math.IsNaN(v) {
				hr[int64(hour)] = v
			}
		}
		out[stem] = hr
	}
	return out
}

// makeRecording runs `vigil simulate --record` against a platform's real
// HTTP ingest (its own broker) and returns the recording's path: 3 beds,
// 1 wearable, 10 minutes of pre-rolled history.
func makeRecording(t *testing.T) string {
	t.Helper()
	addr := testenv.Kafka(t)
	cfg := testenv.Config(t, addr, "")
	p := newPlatform(&cliEnv{cfg: cfg, log: testenv.Logger(t), stdout: io.Discard, stderr: io.Discard})
	if err := p.addStages(true, false, false); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.runner.Run(ctx) }()
	defer func() { cancel(); <-done }()
	path := filepath.Join(t.TempDir(), "ward.jsonl.gz")
	var out, errOut syncBuffer
	args := []string{"simulate", "--record", path, "--set", "simulator.target=http://" + p.cfg.HTTP.Listen,
		"--set", "simulator.tenant=sim-ward", "--set", "simulator.beds=3", "--set", "simulator.wearables=1",
		"--set", "simulator.deteriorating=1", "--set", "simulator.pre_roll=10m", "--set", "simulator.duration=1s"}
	if code := realMain(args, nil, &out, &errOut); code != 0 {
		t.Fatalf("vigil simulate: exit %d: %s", code, errOut.String())
	}
	return path
}

// recordingSamples counts the samples of a recording's request bodies.
func recordingSamples(t *testing.T, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(gz)
	sc.Buffer(nil, replay.MaxRecordingLine)
	var n int64
	for sc.Scan() {
		n += int64(bytes.Count(sc.Bytes(), []byte(`"value"`)))
	}
	return n
}

// TestReplayIntoPlatform is the replay must-show: the real `vigil replay`
// feeds (a) a subset of the PhysioNet 2019 set-B archive, read straight
// from its .tar.gz, (b) MIT-BIH record 100 as a WFDB record, and (c) a
// recording made by `vigil simulate --record`, into a broker on which the
// stream stage runs. It checks the samples on vigil.samples.v1 and the
// features on vigil.features.v1 against values computed here from the
// inputs; then it does the same into a second broker and stream stage, and
// requires identical feature windows (emitted_time_ms aside).
func TestReplayIntoPlatform(t *testing.T) {
	tgz := filepath.Join(testenv.Dataset(t, "sepsis2019-setB"), "training_setB.tar.gz")
	mit := testenv.Dataset(t, "mitbih-100")
	nPSV := 12
	if testing.Short() {
		nPSV = 4
	}
	rec := makeRecording(t)
	recSamples := recordingSamples(t, rec)

	var canon [2][]string
	for run := range 2 {
		addr := testenv.Kafka(t)
		cfg := startStreamStage(t, addr)

		// (a) PSV, straight from the archive, the first nPSV files; the
		// first run shows its progress as plain lines (stderr is not a
		// terminal).
		args := []string{"--max-files", strconv.Itoa(nPSV), tgz}
		if run == 1 {
			args = append([]string{"--quiet"}, args...)
		}
		psv, stderr := vigilReplay(t, addr, args...)
		if psv.files != int64(nPSV) || psv.samples == 0 {
			t.Fatalf("PSV replay: %+v", psv)
		}
		if run == 0 && !strings.Contains(stderr, "replay: replayed ") {
			t.Errorf("no progress line on stderr: %q", stderr)
		}
		// (b) WFDB record 100: waveform chunks through the R-peak
		// detector; rr_interval samples come out.
		wf, _ := vigilReplay(t, addr, "--quiet", filepath.Join(mit, "100.hea"))
		if wf.files != 1 || wf.samples != 2*650000 || wf.refused != 0 {
			t.Fatalf("WFDB replay: %+v (want both signals' 650000 values accepted)", wf)
		}
		// (c) the simulator's recording, at full speed.
		sim, _ := vigilReplay(t, addr, "--quiet", rec)
		if sim.samples != recSamples || sim.refused != 0 {
			t.Fatalf("recording replay: %+v, the recording holds %d samples", sim, recSamples)
		}

		waitStreamCaughtUp(t, addr, cfg)
		batches := batchesByKey(t, addr, cfg)
		byKey, c := features(t, addr, cfg)
		canon[run] = c
		if run == 1 {
			break
		}

		// (a) Samples and features of the PSV patients.
		hrs := psvHeartRates(t, tgz, nPSV)
		var psvSamples int64
		checked := 0
		for stem, hours := range hrs {
			key := "physionet/" + stem
			for _, b := range batches[key] {
				if b.Source != vigilv1.Source_SOURCE_REPLAY || b.Device != "psv" {
					t.Fatalf("batch %v", b)
				}
				psvSamples += int64(len(b.Samples))
			}
			// Each ICU hour is its own 1-minute window (one sample per
			// metric), closed by the next hour's samples: heart_rate's
			// mean is that hour's HR cell, at the window spec's resolution
			// for heart_rate (decimals 0, half away from zero: 67.5 → 68).
			for _, fw := range byKey[key] {
				f := featureOf(fw, "heart_rate")
				if f == nil || fw.SizeMs != 60_000 {
					continue
				}
				hour := (fw.StartMs-replay.DefaultStart().UnixMilli())/3_600_000 + 1
				if want, ok := hours[hour]; !ok || f.Count != 1 || f.Mean != math.Round(want) {
					t.Errorf("%s hour %d: heart_rate %v, PSV HR %v", key, hour, f, want)
				}
				checked++
			}
		}
		if psvSamples != psv.samples {
			t.Errorf("PSV: %d samples on the topic, summary says %d", psvSamples, psv.samples)
		}
		if checked < 5*nPSV {
			t.Errorf("PSV: only %d heart_rate windows checked", checked)
		}
		t.Logf("PSV: %+v; %d heart-rate windows equal to the PSV cells", psv, checked)

		// (b) rr_interval samples of record 100 and their windows.
		checkRecord100(t, mit, batches["physionet/100"], byKey["physionet/100"])

		// (c) The recording's patients: every sample replayed, and every
		// closed window's heart_rate count and mean equal to the samples
		// of that minute on the topic.
		var simSamples int64
		perMin := map[string]map[int64][]float64{}
		for key, bs := range batches {
			if !strings.HasPrefix(key, "sim-ward/") {
				continue
			}
			perMin[key] = map[int64][]float64{}
			for _, b := range bs {
				simSamples += int64(len(b.Samples))
				for _, s := range b.Samples {
					if s.Metric == "heart_rate" { // at the spec's resolution, as above
						m := s.EventTimeMs - s.EventTimeMs%60_000
						perMin[key][m] = append(perMin[key][m], math.Round(s.Value))
					}
				}
			}
		}
		if simSamples != recSamples {
			t.Errorf("recording: %d samples on the topic, %d recorded", simSamples, recSamples)
		}
		windows := 0
		for key, mins := range perMin {
			for _, fw := range byKey[key] {
				f := featureOf(fw, "heart_rate")
				if f == nil || fw.SizeMs != 60_000 {
					continue
				}
				vs := mins[fw.StartMs]
				var sum float64
				for _, v := range vs {
					sum += v
				}
				if int(f.Count) != len(vs) || math.Abs(f.Mean-sum/float64(len(vs))) > 1e-9 {
					t.Errorf("%s minute %d: heart_rate count %d mean %v; samples %d mean %v", key, fw.StartMs, f.Count, f.Mean,
						len(vs), sum/float64(len(vs)))
				}
				windows++
			}
		}
		if len(perMin) < 3 || windows < 8*len(perMin) {
			t.Errorf("recording: %d patients, %d heart_rate windows checked", len(perMin), windows)
		}
		t.Logf("recording: %+v; %d heart-rate windows of %d patients equal to the samples", sim, windows, len(perMin))
	}
	if len(canon[0]) == 0 || !slices.Equal(canon[0], canon[1]) {
		diff := 0
		for diff < min(len(canon[0]), len(canon[1])) && canon[0][diff] == canon[1][diff] {
			diff++
		}
		t.Fatalf("replaying the same input twice: %d vs %d feature windows, first difference at %d", len(canon[0]), len(canon[1]), diff)
	}
	t.Logf("replayed twice: %d identical feature windows", len(canon[0]))
}

// checkRecord100 checks the rr_interval samples of the replayed record 100
// and the stream's windows of them against the annotations 100.atr: lead
// MLII only (the record's second lead, V5, is not the device's RR channel),
// about one interval per annotated beat, each 1-minute window's count and
// mean within a beat and 2 ms of the annotated intervals of that minute,
// and its HRV features (hrv_mean_nn_ms, hrv_sdnn_ms, hrv_rmssd_ms,
// hrv_pnn50_pct) within the tolerances argued in
// ingest/waveform.TestHTTPToHRVFeatures.
func checkRecord100(t *testing.T, dir string, batches []*vigilv1.SampleBatch, fws []*vigilv1.FeatureWindow) {
	t.Helper()
	checkRecord100At(t, dir, replay.DefaultStart().UnixMilli(), batches, fws)
}

// checkRecord100At is checkRecord100 for a record starting at start (ms).
func checkRecord100At(t *testing.T, dir string, start int64, batches []*vigilv1.SampleBatch, fws []*vigilv1.FeatureWindow) {
	t.Helper()
	anns, err := wfdb.ReadAnnotations(dir, "100", "atr", 0)
	if err != nil {
		t.Fatal(err)
	}
	ref := map[int64][]float64{}
	var beats []int64
	for _, a := range anns {
		if a.Type.IsBeat() {
			beats = append(beats, a.Sample)
		}
	}
	for k := 1; k < len(beats); k++ {
		at := start + int64(math.Round(float64(beats[k])*1000/360))
		ref[at-at%60_000] = append(ref[at-at%60_000], float64(beats[k]-beats[k-1])*1000/360)
	}
	n := 0
	for _, b := range batches {
		for _, s := range b.Samples {
			if s.Metric != "rr_interval" || s.Unit != "ms" || s.Channel != "MLII" || s.SourceCode != "derived:ecg" {
				t.Fatalf("record 100 sample %v", s)
			}
			n++
		}
	}
	if math.Abs(float64(n-(len(beats)-1))) > 3 {
		t.Errorf("record 100: %d rr_interval samples, %d annotated intervals", n, len(beats)-1)
	}
	windows := 0
	for _, fw := range fws {
		f := featureOf(fw, "rr_interval")
		if f == nil || fw.SizeMs != 60_000 {
			continue
		}
		want := hrv.Compute(ref[fw.StartMs])
		if d := int(f.Count) - want.N; d < -1 || d > 1 || math.Abs(f.Mean-want.MeanNN) > 2 {
			t.Errorf("record 100 minute %d: rr_interval count %d mean %.2f; annotations %d mean %.2f",
				(fw.StartMs-start)/60_000, f.Count, f.Mean, want.N, want.MeanNN)
		}
		windows++
		got := hrv.Stats{N: int(f.Count), MeanNN: f.Derived["hrv_mean_nn_ms"], SDNN: f.Derived["hrv_sdnn_ms"],
			RMSSD: f.Derived["hrv_rmssd_ms"], PNN50: f.Derived["hrv_pnn50_pct"]}
		if _, ok := f.Derived["hrv_rmssd_ms"]; !ok {
			t.Errorf("record 100 minute %d: no HRV features in %v", (fw.StartMs-start)/60_000, f)
			continue
		}
		if math.Abs(got.MeanNN-want.MeanNN) > 2 || math.Abs(got.SDNN-want.SDNN) > 3+0.05*want.SDNN ||
			math.Abs(got.RMSSD-want.RMSSD) > 3+0.05*want.RMSSD || math.Abs(got.PNN50-want.PNN50) > 4 {
			t.Errorf("record 100 minute %d: HRV %+v; annotations %+v", (fw.StartMs-start)/60_000, got, want)
		}
		if windows == 1 {
			t.Logf("record 100 minute 0: HRV features %+v; annotations %+v", got, want)
		}
	}
	if windows < 29 {
		t.Errorf("record 100: %d closed rr_interval windows, want the 29 before the last", windows)
	}
	t.Logf("record 100: %d rr_interval samples (%d annotated intervals); %d 1-minute windows' count, mean and HRV match the annotations",
		n, len(beats)-1, windows)
}

// TestWaveformHTTPToHRV posts MIT-BIH record 100 (lead MLII) in 10 s
// chunks to POST /v1/waveforms of a platform running ingest and the stream
// stage: the rr_interval samples on vigil.samples.v1 and the 1-minute
// windows' count, mean and HRV features on vigil.features.v1 match the
// annotations (checkRecord100).
func TestWaveformHTTPToHRV(t *testing.T) {
	mit := testenv.Dataset(t, "mitbih-100")
	rec, err := wfdb.Open(mit, "100")
	if err != nil {
		t.Fatal(err)
	}
	sig, err := rec.ReadPhysical()
	if err != nil {
		t.Fatal(err)
	}
	addr := testenv.Kafka(t)
	cfg := testenv.Config(t, addr, "")
	p := newPlatform(&cliEnv{cfg: cfg, log: testenv.Logger(t), stdout: io.Discard, stderr: io.Discard})
	if err := p.addStages(true, true, false); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.runner.Run(ctx) }()
	defer func() { cancel(); <-done }()
	url := "http://" + p.cfg.HTTP.Listen + "/v1/waveforms"
	start := time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC).UnixMilli()
	x := sig[0]
	for off := 0; off < len(x); off += 3600 {
		end := min(off+3600, len(x))
		body, _ := json.Marshal(map[string]any{"tenant": "st-mary", "patient": "p-100", "device": "holter-1",
			"channel": "MLII", "rate_hz": 360, "start_ms": start + int64(off)*1000/360, "values": x[off:end]})
		resp, err := http.Post(url, "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		out, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("chunk at %d: %d %s", off, resp.StatusCode, out)
		}
	}
	waitStreamCaughtUp(t, addr, cfg)
	byKey, _ := features(t, addr, cfg)
	checkRecord100At(t, mit, start, batchesByKey(t, addr, cfg)["st-mary/p-100"], byKey["st-mary/p-100"])
}
