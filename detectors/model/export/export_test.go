package export_test

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	ort "github.com/yalue/onnxruntime_go"

	"github.com/vigilhealth/vigil/detectors/model/export"
	"github.com/vigilhealth/vigil/detectors/model/onnxpb"
	"github.com/vigilhealth/vigil/detectors/model/train"
	"github.com/vigilhealth/vigil/internal/testenv"
	"google.golang.org/protobuf/proto"
)

// tolerance is the bound on |ORT - trainer| per prediction.
const tolerance = 1e-5

// runORT loads model bytes through onnxruntime_go with the npm-provided
// library and returns the [N, 2] output.
func runORT(t *testing.T, model []byte, x []float32, nf int) []float32 {
	t.Helper()
	if !ort.IsInitialized() {
		ort.SetSharedLibraryPath(testenv.ONNXRuntime(t))
		if err := ort.InitializeEnvironment(ort.WithLogLevelError()); err != nil {
			t.Fatalf("initialising ONNX Runtime: %v", err)
		}
	}
	s, err := ort.NewDynamicAdvancedSessionWithONNXData(model, []string{export.DefaultIn}, []string{export.DefaultOut}, nil)
	if err != nil {
		t.Fatalf("loading the exported model in ONNX Runtime %s: %v", ort.GetVersion(), err)
	}
	defer s.Destroy()
	n := len(x) / nf
	in, err := ort.NewTensor(ort.NewShape(int64(n), int64(nf)), x)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Destroy()
	out := []ort.Value{nil}
	if err := s.Run([]ort.Value{in}, out); err != nil {
		t.Fatalf("running the exported model: %v", err)
	}
	defer out[0].Destroy()
	ten, ok := out[0].(*ort.Tensor[float32])
	if !ok {
		t.Fatalf("output is %T, want a float32 tensor", out[0])
	}
	if got := ten.GetShape(); !slices.Equal(got, ort.NewShape(int64(n), 2)) {
		t.Fatalf("output shape %v, want [%d 2]", got, n)
	}
	return slices.Clone(ten.GetData())
}

// compare checks every ORT P(positive) (column 1) and 1-P (column 0)
// against the trainer's Predict and returns the largest difference.
func compare(t *testing.T, m *train.Model, x []float32, out []float32) float64 {
	t.Helper()
	nf := m.NFeatures
	worst := 0.0
	bad, exact := 0, 0
	for i := 0; i < len(x)/nf; i++ {
		want := m.Predict(x[i*nf : (i+1)*nf])
		if float64(out[2*i+1]) == want {
			exact++
		}
		d := math.Abs(float64(out[2*i+1]) - want)
		d0 := math.Abs(float64(out[2*i]) - (1 - want))
		worst = max(worst, d, d0)
		if (d > tolerance || d0 > tolerance) && bad < 5 {
			bad++
			t.Errorf("row %d: ORT [%v %v], trainer P = %v (diff %.3g)", i, out[2*i], out[2*i+1], want, d)
		}
	}
	if len(x) > nf {
		t.Logf("%d of %d P(positive) bit-identical to the trainer's", exact, len(x)/nf)
	}
	return worst
}

// thresholdRows adds, for inner nodes of the trees, a copy of a base row
// with the split feature set exactly to the threshold and to the next
// float32 above and below it: the rows where a float64 or "<" comparison
// would take the other branch.
func thresholdRows(m *train.Model, base []float32, limit int) []float32 {
	nf := m.NFeatures
	var out []float32
	for _, tr := range m.Trees {
		for _, nd := range tr.Nodes {
			if nd.Left < 0 {
				continue
			}
			for _, v := range []float32{nd.Threshold, math.Nextafter32(nd.Threshold, float32(math.Inf(1))), math.Nextafter32(nd.Threshold, float32(math.Inf(-1)))} {
				row := slices.Clone(base[:nf])
				row[nd.Feature] = v
				out = append(out, row...)
			}
			if len(out)/nf >= limit {
				return out
			}
		}
	}
	return out
}

func synthetic(n, nf int, seed uint64) ([]float32, []float64) {
	r := rand.New(rand.NewPCG(seed, 3))
	x := make([]float32, n*nf)
	y := make([]float64, n)
	for i := 0; i < n; i++ {
		row := x[i*nf : (i+1)*nf]
		for j := range row {
			row[j] = float32(math.Round(r.NormFloat64()*40) / 8)
		}
		z := 0.7*float64(row[0]) - 0.4*float64(row[1]) + 0.5*math.Abs(float64(row[2])) - 1.5
		if r.Float64() < 1/(1+math.Exp(-z)) {
			y[i] = 1
		}
	}
	return x, y
}

func TestONNXMatchesTrainerSynthetic(t *testing.T) {
	const nf = 8
	x, y := synthetic(6000, nf, 1)
	held, _ := synthetic(3000, nf, 2)
	for _, algo := range []string{train.GBT, train.LogReg} {
		t.Run(algo, func(t *testing.T) {
			m, err := train.Fit(x, y, nf, train.Config{Algorithm: algo, Trees: 60, Seed: 7})
			if err != nil {
				t.Fatal(err)
			}
			b, err := export.Marshal(m, export.Options{Doc: "synthetic", Metadata: map[string]string{"b": "2", "a": "1"}})
			if err != nil {
				t.Fatal(err)
			}
			again, _ := export.Marshal(m, export.Options{Doc: "synthetic", Metadata: map[string]string{"a": "1", "b": "2"}})
			if !bytes.Equal(b, again) {
				t.Error("exporting the same model twice gave different bytes")
			}
			rows := slices.Clone(held)
			if algo == train.GBT {
				extra := thresholdRows(m, held, 3000)
				if len(extra) == 0 {
					t.Fatal("the trees have no splits; nothing about thresholds is checked")
				}
				rows = append(rows, extra...)
			}
			out := runORT(t, b, rows, nf)
			worst := compare(t, m, rows, out)
			t.Logf("%s: %d rows through ONNX Runtime %s, max |ORT - trainer| = %.3g", algo, len(rows)/nf, ort.GetVersion(), worst)
			// One row per run, as a lightly loaded stream engine may call
			// it (ORT then parallelises over trees, not rows).
			for i := 0; i < 20; i++ {
				row := held[i*nf : (i+1)*nf]
				compare(t, m, row, runORT(t, b, row, nf))
			}
		})
	}
}

func TestONNXModelStructure(t *testing.T) {
	const nf = 4
	x, y := synthetic(2000, nf, 4)
	m, err := train.Fit(x, y, nf, train.Config{Trees: 5})
	if err != nil {
		t.Fatal(err)
	}
	b, err := export.Marshal(m, export.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var mp onnxpb.ModelProto
	if err := proto.Unmarshal(b, &mp); err != nil {
		t.Fatalf("decoding the exported bytes: %v", err)
	}
	if mp.GetIrVersion() != export.IRVersion {
		t.Errorf("ir_version %d", mp.GetIrVersion())
	}
	opsets := map[string]int64{}
	for _, o := range mp.GetOpsetImport() {
		opsets[o.GetDomain()] = o.GetVersion()
	}
	if opsets[""] != export.Opset || opsets[export.MLDomain] != export.MLOpset {
		t.Errorf("opset imports %v", opsets)
	}
	g := mp.GetGraph()
	in := g.GetInput()[0]
	dims := in.GetType().GetTensorType().GetShape().GetDim()
	if in.GetName() != "input" || len(dims) != 2 || dims[0].GetDimParam() == "" || dims[1].GetDimValue() != nf {
		t.Errorf("input %s dims %v, want input [N, %d]", in.GetName(), dims, nf)
	}
	if out := g.GetOutput()[0]; out.GetName() != "probabilities" {
		t.Errorf("output %q", out.GetName())
	}
	var tree *onnxpb.NodeProto
	for _, n := range g.GetNode() {
		if n.GetOpType() == "TreeEnsembleRegressor" {
			tree = n
		}
	}
	if tree == nil || tree.GetDomain() != export.MLDomain {
		t.Fatalf("no ai.onnx.ml TreeEnsembleRegressor node in %v", g.GetNode())
	}
	nodes := 0
	for _, tr := range m.Trees {
		nodes += len(tr.Nodes)
	}
	for _, a := range tree.GetAttribute() {
		if a.GetName() == "nodes_modes" {
			if len(a.GetStrings()) != nodes {
				t.Errorf("%d node modes for %d nodes", len(a.GetStrings()), nodes)
			}
			for _, s := range a.GetStrings() {
				if s := string(s); s != "BRANCH_LEQ" && s != "LEAF" {
					t.Errorf("node mode %q", s)
				}
			}
		}
	}
}

// sepsisColumns are the PSV columns used as features (a last-observation-
// carried-forward value each), plus ICULOS and hours since the last HR.
var sepsisColumns = []string{"HR", "O2Sat", "Temp", "SBP", "MAP", "DBP", "Resp", "FiO2", "pH", "PaCO2", "HCO3",
	"BUN", "Creatinine", "Glucose", "Lactate", "WBC", "Platelets", "Hct", "Bilirubin_total", "Age", "Gender", "HospAdmTime", "ICULOS"}

type sepsisRow struct {
	patient int
	x       []float64 // NaN = never observed
	y       float64
}

// readSepsis reads the first n patients of training_setB.tar.gz (archive
// order) as hourly rows with carried-forward values.
func readSepsis(t *testing.T, n int) ([]sepsisRow, int) {
	t.Helper()
	f, err := os.Open(filepath.Join(testenv.Dataset(t, "sepsis2019-setB"), "training_setB.tar.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(gz)
	var rows []sepsisRow
	patients := 0
	for patients < n {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasSuffix(h.Name, ".psv") {
			continue
		}
		sc := bufio.NewScanner(tr)
		sc.Scan()
		header := strings.Split(sc.Text(), "|")
		col := map[string]int{}
		for i, c := range header {
			col[c] = i
		}
		last := make([]float64, len(sepsisColumns)+1)
		for i := range last {
			last[i] = math.NaN()
		}
		lastHR := math.NaN()
		for sc.Scan() {
			fields := strings.Split(sc.Text(), "|")
			r := sepsisRow{patient: patients, x: make([]float64, len(sepsisColumns)+1)}
			icu, _ := strconv.ParseFloat(fields[col["ICULOS"]], 64)
			for j, c := range sepsisColumns {
				v, err := strconv.ParseFloat(fields[col[c]], 64)
				if err == nil && !math.IsNaN(v) {
					last[j] = v
					if c == "HR" {
						lastHR = icu
					}
				}
				r.x[j] = last[j]
			}
			r.x[len(sepsisColumns)] = icu - lastHR
			r.y, _ = strconv.ParseFloat(fields[col["SepsisLabel"]], 64)
			rows = append(rows, r)
		}
		if err := sc.Err(); err != nil {
			t.Fatal(err)
		}
		patients++
	}
	return rows, patients
}

// TestONNXMatchesTrainerSepsis trains both algorithms on 70% of a few
// hundred set-B patients (missing values filled with the training median,
// as the manifest's fill does), exports, and checks every prediction on the
// held-out 30% through ONNX Runtime against the trainer within 1e-5.
func TestONNXMatchesTrainerSepsis(t *testing.T) {
	nPatients := 400
	if testing.Short() {
		nPatients = 150
	}
	rows, got := readSepsis(t, nPatients)
	nf := len(sepsisColumns) + 1
	isTrain := func(p int) bool { return (uint64(p)*0x9E3779B97F4A7C15)>>61 < 6 } // ~75%, fixed
	// Fill = median of the training rows' observed values.
	fill := make([]float64, nf)
	for j := range fill {
		var vals []float64
		for _, r := range rows {
			if isTrain(r.patient) && !math.IsNaN(r.x[j]) {
				vals = append(vals, r.x[j])
			}
		}
		sort.Float64s(vals)
		if len(vals) > 0 {
			fill[j] = vals[len(vals)/2]
		}
	}
	var xtr, xte []float32
	var ytr, yte []float64
	for _, r := range rows {
		row := make([]float32, nf)
		for j, v := range r.x {
			if math.IsNaN(v) {
				v = fill[j]
			}
			row[j] = float32(v)
		}
		if isTrain(r.patient) {
			xtr, ytr = append(xtr, row...), append(ytr, r.y)
		} else {
			xte, yte = append(xte, row...), append(yte, r.y)
		}
	}
	pos := 0.0
	for _, v := range ytr {
		pos += v
	}
	t.Logf("%d patients: %d training rows (%v positive), %d held-out rows", got, len(ytr), pos, len(yte))
	for _, algo := range []string{train.GBT, train.LogReg} {
		t.Run(algo, func(t *testing.T) {
			// A slice of a few hundred patients has ~60 positive rows:
			// the default min child hessian (50, tuned on thousands of
			// patients) would leave the trees as stumps, so relax it.
			m, err := train.Fit(xtr, ytr, nf, train.Config{Algorithm: algo, Trees: 100, Seed: 1, MinChildWeight: 0.5, L2: 1})
			if err != nil {
				t.Fatal(err)
			}
			b, err := export.Marshal(m, export.Options{})
			if err != nil {
				t.Fatal(err)
			}
			rows := slices.Clone(xte)
			if algo == train.GBT {
				extra := thresholdRows(m, xte, 5000)
				if len(extra) == 0 {
					t.Fatal("the trees have no splits; nothing about thresholds is checked")
				}
				rows = append(rows, extra...)
			}
			out := runORT(t, b, rows, nf)
			worst := compare(t, m, rows, out)
			held := make([]float64, len(yte))
			for i := range held {
				held[i] = float64(out[2*i+1])
			}
			t.Logf("%s: %d rows through ONNX Runtime, max |ORT - trainer| = %.3g; held-out AUROC %.3f", algo, len(rows)/nf, worst, auroc(held, yte))
		})
	}
}

func auroc(p, y []float64) float64 {
	idx := make([]int, len(p))
	for i := range idx {
		idx[i] = i
	}
	sort.Slice(idx, func(a, b int) bool { return p[idx[a]] < p[idx[b]] })
	var rankSum, npos float64
	for i := 0; i < len(idx); {
		j := i
		for j < len(idx) && p[idx[j]] == p[idx[i]] {
			j++
		}
		for k := i; k < j; k++ {
			if y[idx[k]] == 1 {
				rankSum += float64(i+j+1) / 2
				npos++
			}
		}
		i = j
	}
	return (rankSum - npos*(npos+1)/2) / (npos * (float64(len(p)) - npos))
}
