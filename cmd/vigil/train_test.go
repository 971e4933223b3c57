package main

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/apache/arrow/go/v17/arrow/array"
	"github.com/apache/arrow/go/v17/arrow/memory"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/detectors/model"
	"github.com/vigilhealth/vigil/detectors/model/train"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/testenv"
)

// writeTrainCSV writes a CSV of 200 patients x 20 hourly rows whose label
// depends on heart rate and respiratory rate; some cells are missing.
func writeTrainCSV(t *testing.T) string {
	t.Helper()
	r := rand.New(rand.NewPCG(5, 5))
	var b strings.Builder
	b.WriteString("patient,last:heart_rate,last:respiratory_rate,age_h:heart_rate,stay_h,spo2_obs,label\n")
	for p := 0; p < 200; p++ {
		base := 70 + 25*r.NormFloat64()
		for h := 0; h < 20; h++ {
			hr := base + 5*r.NormFloat64()
			rr := 16 + 4*r.NormFloat64()
			z := 0.06*(hr-90) + 0.25*(rr-18) - 1
			label := 0
			if r.Float64() < 1/(1+math.Exp(-z)) {
				label = 1
			}
			hrCell := fmt.Sprintf("%.0f", hr)
			if r.IntN(10) == 0 {
				hrCell = "" // missing: filled with the training median
			}
			fmt.Fprintf(&b, "p%03d,%s,%.0f,%d,%d,%d,%d\n", p, hrCell, rr, r.IntN(3), h, h/2, label)
		}
	}
	path := filepath.Join(t.TempDir(), "train.csv")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestTrainWritesModelAndManifest(t *testing.T) {
	data := writeTrainCSV(t)
	reg := t.TempDir()
	for _, algo := range []string{"gbt", "logreg"} {
		var out, errOut bytes.Buffer
		code := realMain([]string{"train", "--data-dir", t.TempDir(), "--data", data, "--group", "patient",
			"--source", "spo2_obs=count:spo2", "--algo", algo, "--trees", "50", "--holdout", "0.3", "--seed", "3",
			"--registry", reg, "--name", "demo", "--version", algo + "-1", "--description", "test model"}, nil, &out, &errOut)
		if code != 0 {
			t.Fatalf("%s: exit %d\nstdout: %s\nstderr: %s", algo, code, out.String(), errOut.String())
		}
		if !strings.Contains(out.String(), "held-out (") {
			t.Errorf("%s: no held-out figures in %q", algo, out.String())
		}
		dir := filepath.Join(reg, "demo", algo+"-1")
		onnx, err := os.ReadFile(filepath.Join(dir, model.ModelFile))
		if err != nil {
			t.Fatal(err)
		}
		doc, err := os.ReadFile(filepath.Join(dir, model.ManifestFile))
		if err != nil {
			t.Fatal(err)
		}
		man, err := model.ParseManifest(doc)
		if err != nil {
			t.Fatalf("%s: the written manifest does not parse: %v\n%s", algo, err, doc)
		}
		if man.SHA256 != model.SHA256Hex(onnx) || man.Algorithm != algo || man.InputName != "input" ||
			man.Output.Name != "probabilities" || man.Output.Index != 1 {
			t.Errorf("%s: manifest header %+v", algo, man)
		}
		var names, units []string
		for _, in := range man.Inputs {
			names = append(names, in.Name)
			units = append(units, in.Unit)
			if len(in.Reference.Edges) == 0 && in.Name != "spo2_count" {
				t.Errorf("%s: input %s has no drift reference", algo, in.Name)
			}
		}
		if got := strings.Join(names, ","); got != "heart_rate_last,respiratory_rate_last,heart_rate_age_h,stay_h,spo2_obs" {
			t.Errorf("%s: inputs %s", algo, got)
		}
		if got := strings.Join(units, ","); got != "/min,/min,h,h,1" {
			t.Errorf("%s: units %s", algo, got)
		}
		// The heart-rate fill is the training median, near the mean of 70.
		if f := man.Inputs[0].Fill; f < 60 || f > 80 {
			t.Errorf("%s: heart_rate_last fill %v, want the training median (~70)", algo, f)
		}
		if man.Metrics["auroc"] < 0.75 {
			t.Errorf("%s: held-out AUROC %v, want >= 0.75 (label follows heart rate)", algo, man.Metrics["auroc"])
		}
		if man.Training.Patients < 110 || man.Training.Patients > 170 {
			t.Errorf("%s: %d training patients of 200 with a 30%% holdout", algo, man.Training.Patients)
		}
		if man.Threshold <= 0 || man.Threshold >= 1 {
			t.Errorf("%s: threshold %v", algo, man.Threshold)
		}
	}
	servedThroughRegistry(t, reg, data)
}

// servedThroughRegistry loads both trained versions the way the stream
// engine does (Registry.Load checks the sha256 and the catalogue metrics;
// Runtime.Open makes an ONNX Runtime session from the npm library), runs
// the CSV rows, filled with the manifest's fill values, as one Arrow record
// and checks that the served probabilities rank the labels as well as the
// trainer reported.
func servedThroughRegistry(t *testing.T, reg, data string) {
	t.Helper()
	registry := model.OpenRegistry(reg, catalog.Default())
	rt, err := model.NewRuntime(model.RuntimeOptions{LibraryPath: testenv.ONNXRuntime(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := rt.Close(); err != nil {
			t.Error(err)
		}
	}()
	met, err := model.NewMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(data)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(raw)), "\n")[1:]
	for _, version := range []string{"gbt-1", "logreg-1"} {
		man, onnx, err := registry.Load("demo", version)
		if err != nil {
			t.Fatalf("%s: loading from the registry: %v", version, err)
		}
		md, err := rt.Open(man, onnx, met, 0)
		if err != nil {
			t.Fatalf("%s: opening in ONNX Runtime: %v", version, err)
		}
		b := array.NewRecordBuilder(memory.NewGoAllocator(), md.Schema())
		var y []float64
		for _, line := range lines {
			cells := strings.Split(line, ",")
			for j := range man.Inputs {
				v, err := strconv.ParseFloat(cells[j+1], 64)
				if err != nil {
					v = man.Inputs[j].Fill
				}
				b.Field(j).(*array.Float32Builder).Append(float32(v))
			}
			label, _ := strconv.ParseFloat(cells[len(cells)-1], 64)
			y = append(y, label)
		}
		rec := b.NewRecord()
		p, err := md.Infer(rec)
		rec.Release()
		b.Release()
		if err != nil {
			t.Fatalf("%s: inference: %v", version, err)
		}
		a := train.AUROC(p, y)
		if a < 0.75 {
			t.Errorf("%s: served AUROC on all rows %.3f, want >= 0.75", version, a)
		}
		t.Logf("%s: %d rows served through the registry and ONNX Runtime, AUROC %.3f (held-out in manifest %.3f)", version, len(p), a, man.Metrics["auroc"])
		if err := md.Close(); err != nil {
			t.Error(err)
		}
	}
}

func TestTrainCSVErrorsNameLineAndColumn(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := "stay_h,label\n1,0\n2,1\n"
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"bad number", []string{"--data", write("a.csv", good+"x3,0\n")}, []string{"line 4", "stay_h", "not a finite number"}},
		{"bad label", []string{"--data", write("b.csv", good+"3,yes\n")}, []string{"line 4", "label", "not 0 or 1"}},
		{"ragged", []string{"--data", write("c.csv", good+"3,0,9\n")}, []string{"line 4", "wrong number of fields"}},
		{"no label column", []string{"--data", write("d.csv", good), "--label", "outcome"}, []string{"--label", "outcome", "no such column", "stay_h, label"}},
		{"unnamed input", []string{"--data", write("e.csv", "hr,label\n1,0\n2,1\n")}, []string{"hr", "--source hr=<source>"}},
		{"unknown metric", []string{"--data", write("f.csv", "last:pulse,label\n1,0\n2,1\n")}, []string{"pulse", "not a catalogue metric"}},
	} {
		var out, errOut bytes.Buffer
		code := realMain(append([]string{"train", "--data-dir", dir}, tc.args...), nil, &out, &errOut)
		if code != 1 {
			t.Errorf("%s: exit %d, want 1; stderr %s", tc.name, code, errOut.String())
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(errOut.String(), w) {
				t.Errorf("%s: stderr %q does not mention %q", tc.name, errOut.String(), w)
			}
		}
	}
}

// FuzzReadTrainCSV feeds arbitrary bytes to the CSV reader of vigil train:
// it must return an error or columns as long as the labels, never panic.
func FuzzReadTrainCSV(f *testing.F) {
	f.Add([]byte("patient,last:heart_rate,stay_h,label\np1,80,1,0\np1,,2,1\n"))
	f.Add([]byte("label,stay_h\n1,NaN\n0,NA\n"))
	f.Add([]byte("stay_h,label\n\"1\",0\nx,1\n"))
	f.Add([]byte("a,a,label\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := readTrainCSV(bytes.NewReader(b), &trainFlags{label: "label"})
		if err != nil {
			return
		}
		for j, c := range d.cols {
			if len(c) != len(d.y) {
				t.Fatalf("column %s has %d values for %d labels", d.names[j], len(c), len(d.y))
			}
		}
	})
}
