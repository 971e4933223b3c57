package sepsis2019

import (
	"bytes"
	"context"
	"encoding/csv"
	"math"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/detectors/ews"
	"github.com/vigilhealth/vigil/detectors/model/train"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/testenv"
)

// subset reads the first n patients of set B (short under -short) and
// canonicalises them as Validate does.
func subset(t *testing.T, n, short int) ([]*Patient, []*Canonical, config.Config) {
	t.Helper()
	if testing.Short() {
		n = short
	}
	pts, err := Read(context.Background(), tarball(t), n)
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Kafka.Partitions = 3
	v := NewValidator(cfg)
	now := time.Now().UnixMilli()
	cs := make([]*Canonical, len(pts))
	for i, p := range pts {
		cs[i] = Canonicalize(v, "physionet", p, now)
	}
	return pts, cs, cfg
}

// expectedEWS computes a table's score at every row directly with
// detectors/ews from the carried-forward canonical inputs of the row (the
// admission consciousness sample and every accepted sample up to the row),
// with no staleness limit: 0 where the table has nothing to score.
func expectedEWS(rs *ews.Ruleset, cs []*Canonical) []float64 {
	var out []float64
	for _, c := range cs {
		carry := NewCarry()
		carry.Add(c.Admission)
		latest := func(metric string) (ews.Observation, bool) {
			v, t, ok := carry.Latest(metric)
			return ews.Observation{Value: v, TimeMs: t}, ok
		}
		for i := range c.Patient.Rows {
			carry.Add(c.Rows[i]...)
			s := rs.Score(ews.Request{Tenant: "physionet", Patient: c.Patient.ID, AtMs: c.Patient.Rows[i].TimeMs(),
				Staleness: StalenessForever, Latest: latest})
			out = append(out, s.GetValue())
		}
	}
	return out
}

// readCSV parses the CSV and checks its header.
func readCSV(t *testing.T, b []byte) [][]string {
	t.Helper()
	recs, err := csv.NewReader(bytes.NewReader(b)).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(recs[0], CSVHeader()) {
		t.Fatalf("header %v, want %v", recs[0], CSVHeader())
	}
	return recs[1:]
}

// A few hundred patients through the real pipeline: the CSV has one row
// per input row; every NEWS2, MEWS and qSOFA value is the table's score on
// the carried-forward inputs of that row.
func TestPipelineScoresEqualTables(t *testing.T) {
	pts, cs, cfg := subset(t, 300, 60)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := RunPipeline(ctx, cs, PipelineOptions{Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := WriteCSV(&b, pts, res.Scores, ModelKind(res.Kinds)); err != nil {
		t.Fatal(err)
	}
	rows := readCSV(t, b.Bytes())
	if len(rows) != CountRows(pts) {
		t.Fatalf("%d CSV rows for %d input rows", len(rows), CountRows(pts))
	}
	i := 0
	for _, p := range pts {
		for _, r := range p.Rows {
			want := []string{p.ID, strconv.Itoa(r.ICULOS), map[bool]string{false: "0", true: "1"}[r.Label]}
			if !slices.Equal(rows[i][:3], want) {
				t.Fatalf("CSV row %d starts %v, want %v", i+2, rows[i][:3], want)
			}
			if rows[i][6] != "" {
				t.Fatalf("CSV row %d has a model value %q but no model is configured", i+2, rows[i][6])
			}
			i++
		}
	}
	// What was published: the admission sample of each patient plus every
	// accepted value; refused values are counted by reason.
	var accepted, refused int64
	for _, c := range cs {
		accepted++
		for _, ss := range c.Rows {
			accepted += int64(len(ss))
		}
		refused += int64(len(c.Refused))
	}
	var gotRefused int64
	for _, n := range res.Refused {
		gotRefused += int64(n)
	}
	if res.Samples != accepted || gotRefused != refused {
		t.Errorf("published %d samples, refused %d; want %d and %d", res.Samples, gotRefused, accepted, refused)
	}
	for col, kind := range map[int]string{3: KindNEWS2, 4: KindMEWS, 5: KindQSOFA} {
		want := expectedEWS(ews.Embedded(kind), cs)
		bad, nonzero := 0, 0
		for i, w := range want {
			got, err := strconv.ParseFloat(rows[i][col], 64)
			if err != nil {
				t.Fatalf("%s: CSV row %d: %q is not a score", kind, i+2, rows[i][col])
			}
			if w != 0 {
				nonzero++
			}
			if got != w {
				if bad < 5 {
					t.Errorf("%s: CSV row %d (%v): pipeline %v, table on the carried-forward inputs %v", kind, i+2, rows[i][:3], got, w)
				}
				bad++
			}
		}
		if bad > 0 {
			t.Errorf("%s: %d of %d rows differ", kind, bad, len(want))
		}
		if nonzero == 0 {
			t.Errorf("%s: every expected score is 0: the check proves nothing", kind)
		}
	}
	// The figures are computed on what the pipeline produced.
	e, err := Evaluate(KindNEWS2, SetAll, pts, res.Scores[KindNEWS2], ThresholdNEWS2, nil)
	if err != nil {
		t.Fatal(err)
	}
	if e.Rows != len(rows) || !(e.AUROC > 0.5 && e.AUROC < 1) {
		t.Errorf("NEWS2 on %d rows: AUROC %v", e.Rows, e.AUROC)
	}
	t.Logf("%d patients, %d rows, %d samples in %s; NEWS2 AUROC %.4f utility %.4f",
		len(pts), len(rows), res.Samples, res.Elapsed, e.AUROC, e.Utility)
}

// A small model trained on the 70 % and run by the stream engine through
// ONNX Runtime scores every held-out row as the trainer predicts it from
// the same carried-forward inputs (within 1e-5).
func TestPipelineModelEqualsTrainer(t *testing.T) {
	pts, cs, cfg := subset(t, 300, 150)
	trainPts, testPts := Split(pts, DefaultSeed)
	byID := map[string]*Canonical{}
	for _, c := range cs {
		byID[c.Patient.ID] = c
	}
	pick := func(ps []*Patient) []*Canonical {
		var out []*Canonical
		for _, p := range ps {
			out = append(out, byID[p.ID])
		}
		return out
	}
	reg := t.TempDir()
	tc := train.DefaultConfig()
	tc.Trees = 20
	tc.MinChildWeight = 0.05 // a few septic patients: let the trees split
	tr, err := TrainModel(context.Background(), pick(trainPts), pick(testPts), TrainOptions{Registry: reg, Seed: DefaultSeed, Config: tc, Data: "test subset"})
	if err != nil {
		t.Fatal(err)
	}
	if tr.Manifest.Training.Patients != int64(len(trainPts)) || tr.Manifest.Metrics["train_auroc"] <= 0.5 {
		t.Fatalf("manifest training %+v metrics %v", tr.Manifest.Training, tr.Manifest.Metrics)
	}
	cfg.Detectors.Models.Registry = reg
	cfg.Detectors.Models.ONNXRuntimeLibrary = testenv.ONNXRuntime(t)
	cfg.Detectors.Models.Run = []config.ModelRef{{Name: tr.Manifest.Name, Version: tr.Manifest.Version}}
	held := pick(testPts)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := RunPipeline(ctx, held, PipelineOptions{Config: cfg})
	if err != nil {
		t.Fatal(err)
	}
	kind := ModelKind(res.Kinds)
	if kind != "model:"+ModelName {
		t.Fatalf("score kinds %v: no model scores", res.Kinds)
	}
	decimals, err := Decimals("")
	if err != nil {
		t.Fatal(err)
	}
	mx := BuildMatrix(tr.Manifest, held, decimals)
	got := res.Scores[kind]
	bad := 0
	for i := range got {
		want := tr.Model.Predict(mx.X[i*mx.Cols : (i+1)*mx.Cols])
		if math.IsNaN(got[i]) || math.Abs(got[i]-want) > 1e-5 {
			if bad < 5 {
				pi, ri := locate(held, i)
				t.Errorf("row %d (%s ICULOS %d): pipeline model score %v, trainer %v; inputs %v", i, held[pi].Patient.ID, held[pi].Patient.Rows[ri].ICULOS, got[i], want, mx.X[i*mx.Cols:(i+1)*mx.Cols])
			}
			bad++
		}
	}
	if bad > 0 {
		t.Fatalf("%d of %d rows differ", bad, len(got))
	}
	e, err := Evaluate(kind, SetHeldOut, patientsOf(held), got, tr.Manifest.Threshold, nil)
	if err != nil {
		t.Fatal(err)
	}
	if math.Abs(e.AUROC-tr.TestAUROC) > 1e-3 {
		t.Errorf("held-out AUROC through the pipeline %v, trainer's own %v", e.AUROC, tr.TestAUROC)
	}
	t.Logf("model %s: %d held-out rows, AUROC %.4f utility %.4f", tr.Manifest.Version, len(got), e.AUROC, e.Utility)
}

// locate returns the patient and row index of global row i.
func locate(cs []*Canonical, i int) (int, int) {
	for k, c := range cs {
		if i < len(c.Patient.Rows) {
			return k, i
		}
		i -= len(c.Patient.Rows)
	}
	return -1, -1
}
