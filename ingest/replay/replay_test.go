package replay

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// tarball is the real challenge archive (20,000 PSV files).
func tarball(t testing.TB) string {
	return filepath.Join(testenv.Dataset(t, "sepsis2019-setB"), "training_setB.tar.gz")
}

// psvFiles streams the real tarball and returns the content of the named
// entries (by base name) plus the first n entries in archive order.
func psvFiles(t testing.TB, n int, names ...string) map[string][]byte {
	t.Helper()
	f, err := os.Open(tarball(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(gz)
	out := map[string][]byte{}
	want := map[string]bool{}
	for _, nm := range names {
		want[nm] = true
	}
	taken := 0
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		base := filepath.Base(h.Name)
		if h.Typeflag != tar.TypeReg || !strings.HasSuffix(base, ".psv") {
			continue
		}
		if taken < n || want[base] {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			out[base] = b
			if !want[base] {
				taken++
			}
			delete(want, base)
		}
		if taken >= n && len(want) == 0 {
			break
		}
	}
	if len(want) > 0 {
		t.Fatalf("entries %v not in the tarball", want)
	}
	return out
}

// smallTarball writes files (sorted by name) as a .tar.gz in a temp dir.
func smallTarball(t testing.TB, files map[string][]byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "subset.tar.gz")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	gz := gzip.NewWriter(f)
	tw := tar.NewWriter(gz)
	_ = tw.WriteHeader(&tar.Header{Name: "subset/", Typeflag: tar.TypeDir, Mode: 0o755})
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		if err := tw.WriteHeader(&tar.Header{Name: "subset/" + n, Mode: 0o644, Size: int64(len(files[n])), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(files[n]); err != nil {
			t.Fatal(err)
		}
	}
	if err := errors.Join(tw.Close(), gz.Close(), f.Close()); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestPSVReaderRealFile checks the reader on p100001 of the real archive
// against its first rows, read by eye:
//
//	row 1: all vitals NaN, ICULOS 1
//	row 2: HR 93, O2Sat 92.5, SBP 110, MAP 76, DBP 56, Resp 22, ICULOS 2
//	row 3: HR 91, O2Sat 96, SBP 108, MAP 84.5, DBP 72, Resp 23.5, Glucose 233
//	row 7: Temp 36.5
func TestPSVReaderRealFile(t *testing.T) {
	files := psvFiles(t, 3, "p100001.psv")
	pr, err := NewPSVReader(bytes.NewReader(files["p100001.psv"]))
	if err != nil {
		t.Fatal(err)
	}
	h := pr.Header
	if len(h.Columns) != 41 || h.Columns[h.ICULOS] != "ICULOS" || h.ICULOS != 39 {
		t.Fatalf("header: %d columns, ICULOS at %d", len(h.Columns), h.ICULOS)
	}
	var got []string
	for _, c := range h.Vitals {
		got = append(got, c.Column+"→"+c.Metric)
	}
	want := "HR→heart_rate O2Sat→spo2 Temp→body_temperature SBP→systolic_bp MAP→mean_arterial_pressure DBP→diastolic_bp Resp→respiratory_rate FiO2→fio2"
	if strings.Join(got, " ") != want {
		t.Errorf("vital columns: %s", strings.Join(got, " "))
	}
	col := map[string]int{}
	for i, c := range h.Columns {
		col[c] = i
	}
	rows := map[int][]float64{}
	n := 0
	for {
		r, err := pr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil || r.Err != nil {
			t.Fatalf("row: %v %v", err, r.Err)
		}
		n++
		rows[r.Number] = slices.Clone(r.Values)
	}
	wantLines := bytes.Count(files["p100001.psv"], []byte("\n")) - 1
	if n != wantLines {
		t.Errorf("%d rows, file has %d data lines", n, wantLines)
	}
	check := func(row int, name string, want float64) {
		t.Helper()
		v := rows[row][col[name]]
		if math.IsNaN(want) != math.IsNaN(v) || (!math.IsNaN(want) && v != want) {
			t.Errorf("row %d %s = %v, want %v", row, name, v, want)
		}
	}
	nan := math.NaN()
	for _, c := range []string{"HR", "O2Sat", "Temp", "SBP", "MAP", "DBP", "Resp", "FiO2"} {
		check(1, c, nan)
	}
	check(1, "ICULOS", 1)
	check(1, "Age", 73)
	check(2, "HR", 93)
	check(2, "O2Sat", 92.5)
	check(2, "SBP", 110)
	check(2, "MAP", 76)
	check(2, "DBP", 56)
	check(2, "Resp", 22)
	check(2, "Temp", nan)
	check(2, "ICULOS", 2)
	check(3, "MAP", 84.5)
	check(3, "Resp", 23.5)
	check(3, "Glucose", 233)
	check(7, "Temp", 36.5)
}

func TestPSVLineErrors(t *testing.T) {
	dst := make([]float64, 3)
	for _, tc := range []struct {
		line string
		ok   bool
	}{
		{"1|NaN|3", true},
		{"1||3", true},
		{"1|2", false},
		{"1|2|3|4", false},
		{"1|x|3", false},
		{"1|Inf|3", false},
		{"1|2|3\r", true},
	} {
		err := ParsePSVLine([]byte(tc.line), dst)
		if (err == nil) != tc.ok {
			t.Errorf("%q: err %v", tc.line, err)
		}
	}
	if _, err := ParsePSVHeader([]byte("HR|O2Sat")); err == nil {
		t.Error("header without ICULOS accepted")
	}
	if _, err := ParsePSVHeader([]byte("HR|HR|ICULOS")); err == nil {
		t.Error("duplicate column accepted")
	}
}

// FuzzPSVLine: the line parser never panics, and what it accepts it
// accepts whole: as many values as columns, each finite or NaN.
func FuzzPSVLine(f *testing.F) {
	files := psvFiles(f, 2)
	for _, b := range files {
		for i, l := range bytes.Split(b, []byte("\n")) {
			if i < 6 {
				f.Add(l)
			}
		}
	}
	f.Add([]byte("1|2|3"))
	f.Add([]byte("NaN|nan|1e309"))
	f.Fuzz(func(t *testing.T, line []byte) {
		if _, err := ParsePSVHeader(line); err == nil && !bytes.Contains(line, []byte("ICULOS")) {
			t.Fatalf("header without ICULOS accepted: %q", line)
		}
		dst := make([]float64, 41)
		if err := ParsePSVLine(line, dst); err == nil {
			if c := bytes.Count(bytes.TrimSuffix(line, []byte("\r")), []byte("|")); c != 40 {
				t.Fatalf("accepted %d separators for 41 columns", c)
			}
			for _, v := range dst {
				if math.IsInf(v, 0) {
					t.Fatalf("infinite value accepted from %q", line)
				}
			}
		}
	})
}

func newReplayer(t testing.TB, cfg config.Config, opts Options) *Replayer {
	t.Helper()
	r, err := New(cfg, stage.Deps{Log: testenv.Logger(t), Metrics: prometheus.NewRegistry()}, opts, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close(context.Background()) })
	return r
}

func decodeBatches(t testing.TB, addr string) []*vigilv1.SampleBatch {
	t.Helper()
	var out []*vigilv1.SampleBatch
	for _, rec := range testenv.ReadAll(t, addr, config.Default().Kafka.Topics.Samples) {
		var b vigilv1.SampleBatch
		if err := proto.Unmarshal(rec.Value, &b); err != nil {
			t.Fatal(err)
		}
		if string(rec.Key) != b.Tenant+"/"+b.Patient {
			t.Fatalf("record key %q for batch of %s/%s", rec.Key, b.Tenant, b.Patient)
		}
		out = append(out, &b)
	}
	return out
}

func TestReplayPSVTarballIntoKafka(t *testing.T) {
	files := psvFiles(t, 5, "p100001.psv")
	tgz := smallTarball(t, files)
	addr := testenv.Kafka(t)
	cfg := testenv.Config(t, addr, "")
	r := newReplayer(t, cfg, Options{})
	st, err := r.Run(context.Background(), []string{tgz})
	if err != nil {
		t.Fatal(err)
	}
	if st.Files != int64(len(files)) {
		t.Errorf("files %d, want %d", st.Files, len(files))
	}
	// Count what the files hold, independently of the reader: non-NaN
	// vital cells, and lab cells.
	var wantVitals, wantLabs int64
	for _, b := range files {
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		head := strings.Split(lines[0], "|")
		for _, l := range lines[1:] {
			for i, c := range strings.Split(l, "|") {
				if c == "NaN" {
					continue
				}
				switch head[i] {
				case "HR", "O2Sat", "Temp", "SBP", "MAP", "DBP", "Resp", "FiO2":
					wantVitals++
				case "EtCO2", "Age", "Gender", "Unit1", "Unit2", "HospAdmTime", "ICULOS", "SepsisLabel":
				default:
					wantLabs++
				}
			}
		}
	}
	if st.Samples+st.Refused != wantVitals || st.Labs != wantLabs || st.Samples == 0 {
		t.Errorf("stats %+v: want samples+refused = %d vital cells, labs = %d", st, wantVitals, wantLabs)
	}
	batches := decodeBatches(t, addr)
	var n int64
	var first *vigilv1.SampleBatch
	for _, b := range batches {
		n += int64(len(b.Samples))
		if b.Source != vigilv1.Source_SOURCE_REPLAY || b.Tenant != "physionet" || b.Device != "psv" || b.IngestTimeMs == 0 {
			t.Fatalf("batch header %v", b)
		}
		if b.MessageId == "replay-p100001-2" {
			first = b
		}
	}
	if n != st.Samples || int64(len(batches)) != st.Batches {
		t.Errorf("topic holds %d samples in %d batches; stats say %d in %d", n, len(batches), st.Samples, st.Batches)
	}
	if first == nil {
		t.Fatal("no batch replay-p100001-2")
	}
	// Row 2 of p100001 (ICULOS 2): event time one hour after the start.
	hour2 := time.Date(2019, 1, 1, 1, 0, 0, 0, time.UTC).UnixMilli()
	got := map[string]float64{}
	for _, s := range first.Samples {
		if s.EventTimeMs != hour2 || s.Sequence != 2 {
			t.Errorf("sample %v: want event time %d, sequence 2", s, hour2)
		}
		got[s.Metric+" "+s.Unit] = s.Value
	}
	want := map[string]float64{"heart_rate /min": 93, "spo2 %": 92.5, "systolic_bp mm[Hg]": 110,
		"mean_arterial_pressure mm[Hg]": 76, "diastolic_bp mm[Hg]": 56, "respiratory_rate /min": 22}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("p100001 row 2 samples %v, want %v", got, want)
	}
	// Refusals are on the dead-letter topic, one each.
	dls := testenv.ReadAll(t, addr, cfg.Kafka.Topics.DeadLetter)
	if int64(len(dls)) != st.Refused {
		t.Errorf("%d dead letters, %d refused", len(dls), st.Refused)
	}
	for _, rec := range dls {
		var dl vigilv1.DeadLetter
		_ = proto.Unmarshal(rec.Value, &dl)
		if dl.Source != vigilv1.Source_SOURCE_REPLAY || dl.Reason == "" || !strings.Contains(dl.Origin, ".psv:") || len(dl.Raw) == 0 {
			t.Errorf("dead letter %v", &dl)
		}
	}
}

// TestReplayPSVFolderAndFiO2 replays a folder holding one hand-written PSV
// file: FiO2 0.5 (a fraction) becomes fio2 50 %, a heart rate of 400 is
// refused (out of range) into a dead letter naming the HR column, and a
// malformed row is one dead letter.
func TestReplayPSVFolderAndFiO2(t *testing.T) {
	dir := t.TempDir()
	psv := "HR|O2Sat|Temp|SBP|MAP|DBP|Resp|EtCO2|FiO2|Glucose|ICULOS|SepsisLabel\n" +
		"80|97|37|120|90|70|16|35|0.5|110|1|0\n" +
		"400|NaN|NaN|NaN|NaN|NaN|NaN|NaN|NaN|NaN|2|0\n" +
		"81|bad\n"
	if err := os.WriteFile(filepath.Join(dir, "p900001.psv"), []byte(psv), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := testenv.Kafka(t)
	cfg := testenv.Config(t, addr, "")
	r := newReplayer(t, cfg, Options{Tenant: "icu-a", Start: time.Date(2020, 2, 3, 0, 0, 0, 0, time.UTC)})
	st, err := r.Run(context.Background(), []string{dir})
	if err != nil {
		t.Fatal(err)
	}
	if st.Samples != 8 || st.Refused != 2 || st.Labs != 1 || st.Unmapped != 1 || st.Rows != 3 {
		t.Errorf("stats %+v", st)
	}
	batches := decodeBatches(t, addr)
	if len(batches) != 1 || batches[0].Tenant != "icu-a" || batches[0].Patient != "p900001" {
		t.Fatalf("batches %v", batches)
	}
	for _, s := range batches[0].Samples {
		if s.Metric == "fio2" && (s.Value != 50 || s.Unit != "%") {
			t.Errorf("fio2 sample %v: want 50 %%", s)
		}
		if s.EventTimeMs != time.Date(2020, 2, 3, 0, 0, 0, 0, time.UTC).UnixMilli() {
			t.Errorf("event time %d", s.EventTimeMs)
		}
	}
	reasons := map[string]string{}
	for _, rec := range testenv.ReadAll(t, addr, cfg.Kafka.Topics.DeadLetter) {
		var dl vigilv1.DeadLetter
		_ = proto.Unmarshal(rec.Value, &dl)
		reasons[dl.Reason] = dl.Field + " " + dl.MessageId + " " + string(dl.Raw)
	}
	if reasons["out_of_range"] != "HR replay-p900001-2 400|NaN|NaN|NaN|NaN|NaN|NaN|NaN|NaN|NaN|2|0" ||
		!strings.HasPrefix(reasons["malformed_message"], " replay-p900001-3 81|bad") {
		t.Errorf("dead letters %q", reasons)
	}
}
