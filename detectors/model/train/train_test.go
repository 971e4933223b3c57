package train

import (
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

// synthetic makes n rows of nf features where P(y=1) follows a known
// non-linear function of the first three features (the rest is noise);
// values are rounded to a grid so many rows sit exactly on split thresholds.
func synthetic(n, nf int, seed uint64) ([]float32, []float64) {
	r := rand.New(rand.NewPCG(seed, 7))
	x := make([]float32, n*nf)
	y := make([]float64, n)
	for i := 0; i < n; i++ {
		row := x[i*nf : (i+1)*nf]
		for j := range row {
			row[j] = float32(math.Round(r.NormFloat64()*20) / 4)
		}
		z := 0.8*float64(row[0]) - 0.5*float64(row[1]) + 0.6*math.Abs(float64(row[2])) - 2
		if r.Float64() < 1/(1+math.Exp(-z)) {
			y[i] = 1
		}
	}
	return x, y
}

func TestGBTLearnsAndGeneralises(t *testing.T) {
	const nf = 6
	x, y := synthetic(20000, nf, 1)
	xt, yt := synthetic(5000, nf, 2)
	cfg := DefaultConfig()
	cfg.Trees = 100
	m, err := Fit(x, y, nf, cfg)
	if err != nil {
		t.Fatal(err)
	}
	p := m.PredictBatch(xt, nil)
	a := AUROC(p, yt)
	// A tree model learns the |x2| term, a linear one cannot.
	if a < 0.85 {
		t.Errorf("held-out AUROC %.3f, want >= 0.85", a)
	}
	lr, err := Fit(x, y, nf, Config{Algorithm: LogReg})
	if err != nil {
		t.Fatal(err)
	}
	al := AUROC(lr.PredictBatch(xt, nil), yt)
	if a <= al {
		t.Errorf("GBT AUROC %.3f not above logistic regression %.3f on a non-linear target", a, al)
	}
	// The noise features get (almost) no importance.
	for j := 3; j < nf; j++ {
		if m.Importance[j] > 0.1*m.Importance[0] {
			t.Errorf("importance of noise feature %d = %.1f, of feature 0 = %.1f", j, m.Importance[j], m.Importance[0])
		}
	}
	t.Logf("held-out AUROC: gbt %.4f, logreg %.4f; %d trees, %d nodes in tree 0", a, al, len(m.Trees), len(m.Trees[0].Nodes))
}

func TestGBTDeterministic(t *testing.T) {
	const nf = 5
	x, y := synthetic(8000, nf, 3)
	cfg := Config{Trees: 30, Seed: 42, Workers: 1}
	a, err := Fit(x, y, nf, cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Workers = 4
	b, err := Fit(x, y, nf, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if a.Base != b.Base || len(a.Trees) != len(b.Trees) {
		t.Fatalf("models differ: base %v vs %v, %d vs %d trees", a.Base, b.Base, len(a.Trees), len(b.Trees))
	}
	for i := range a.Trees {
		if !slices.Equal(a.Trees[i].Nodes, b.Trees[i].Nodes) {
			t.Fatalf("tree %d differs between 1 and 4 workers", i)
		}
	}
	cfg.Seed = 43
	c, err := Fit(x, y, nf, cfg)
	if err != nil {
		t.Fatal(err)
	}
	same := true
	for i := range a.Trees {
		same = same && slices.Equal(a.Trees[i].Nodes, c.Trees[i].Nodes)
	}
	if same {
		t.Error("a different seed gave the same trees (subsampling ignores the seed)")
	}
}

// TestThresholdsAreInclusive checks that every split threshold is a
// training value (so the binned "bin <= b" decisions made while training are
// exactly the float32 "x <= threshold" decisions of Predict and the ONNX
// BRANCH_LEQ nodes), that a value equal to it goes left and the next float32
// above it goes right.
func TestThresholdsAreInclusive(t *testing.T) {
	const nf = 3
	x, y := synthetic(5000, nf, 5)
	m, err := Fit(x, y, nf, Config{Trees: 20, Subsample: 1, ColSample: 1})
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, tr := range m.Trees {
		for _, nd := range tr.Nodes {
			if nd.Left < 0 {
				continue
			}
			// The threshold is an actual training value.
			found := false
			for i := int(nd.Feature); i < len(x); i += nf {
				if x[i] == nd.Threshold {
					found = true
					break
				}
			}
			if !found {
				t.Fatalf("threshold %v of feature %d is not a training value", nd.Threshold, nd.Feature)
			}
			row := make([]float32, nf)
			row[nd.Feature] = nd.Threshold
			one := Tree{Nodes: []Node{nd, {Left: -1, Right: -1, Value: 1}, {Left: -1, Right: -1, Value: 2}}}
			one.Nodes[0].Left, one.Nodes[0].Right = 1, 2
			if got := one.leaf(row); got != 1 {
				t.Fatalf("row equal to threshold %v went right", nd.Threshold)
			}
			row[nd.Feature] = math.Nextafter32(nd.Threshold, float32(math.Inf(1)))
			if got := one.leaf(row); got != 2 {
				t.Fatalf("row just above threshold %v went left", nd.Threshold)
			}
			checked++
		}
	}
	if checked == 0 {
		t.Fatal("no inner nodes")
	}
}

func TestLogRegRecoversCoefficients(t *testing.T) {
	const n, nf = 40000, 3
	r := rand.New(rand.NewPCG(9, 9))
	x := make([]float32, n*nf)
	y := make([]float64, n)
	// Raw features on very different scales and offsets: the fit runs on
	// standardised inputs and folds back.
	want := []float64{0.02, -1.5, 0.8}
	bias := -0.5
	for i := 0; i < n; i++ {
		x[i*nf] = float32(100 + 50*r.NormFloat64())
		x[i*nf+1] = float32(r.NormFloat64() * 0.5)
		x[i*nf+2] = float32(r.NormFloat64())
		z := bias - 0.02*100
		for j := 0; j < nf; j++ {
			z += want[j] * float64(x[i*nf+j])
		}
		if r.Float64() < 1/(1+math.Exp(-z)) {
			y[i] = 1
		}
	}
	m, err := Fit(x, y, nf, Config{Algorithm: LogReg, Lambda: 1e-8})
	if err != nil {
		t.Fatal(err)
	}
	for j, w := range want {
		if math.Abs(float64(m.Weights[j])-w) > 0.1*math.Abs(w)+0.01 {
			t.Errorf("weight %d = %v, want about %v", j, m.Weights[j], w)
		}
	}
	if math.Abs(float64(m.Bias)-(bias-2)) > 0.3 {
		t.Errorf("bias = %v, want about %v", m.Bias, bias-2)
	}
	// A strong penalty shrinks the weights towards 0.
	s, err := Fit(x, y, nf, Config{Algorithm: LogReg, Lambda: 1})
	if err != nil {
		t.Fatal(err)
	}
	if math.Abs(float64(s.Weights[1])) >= math.Abs(float64(m.Weights[1]))/2 {
		t.Errorf("lambda 1 weight %v not shrunk from %v", s.Weights[1], m.Weights[1])
	}
}

func TestFitRefusesBadInput(t *testing.T) {
	x := []float32{1, 2, 3, 4, 5, 6}
	for _, tc := range []struct {
		name string
		x    []float32
		y    []float64
		cfg  Config
		want string
	}{
		{"nan", []float32{1, float32(math.NaN()), 3, 4, 5, 6}, []float64{0, 1, 0}, Config{}, "row 0 feature 1"},
		{"label", x, []float64{0, 2, 1}, Config{}, "label of row 1"},
		{"one class", x, []float64{1, 1, 1}, Config{}, "both classes"},
		{"rows", x, []float64{0, 1}, Config{}, "3 rows of features but 2 labels"},
		{"algo", x, []float64{0, 1, 0}, Config{Algorithm: "svm"}, "train config algorithm"},
		{"bins", x, []float64{0, 1, 0}, Config{Bins: 1000}, "train config bins"},
	} {
		_, err := Fit(tc.x, tc.y, 2, tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one containing %q", tc.name, err, tc.want)
		}
	}
}

// BenchmarkFitGBT trains the default GBT (500 trees) on 550,000 rows x 25
// features (the size of the PhysioNet 2019 training sets) and reports
// rows/s of whole fits and row-trees/s.
func BenchmarkFitGBT(b *testing.B) {
	benchFit(b, Config{})
}

// BenchmarkFitLogReg is BenchmarkFitGBT for logistic regression.
func BenchmarkFitLogReg(b *testing.B) {
	benchFit(b, Config{Algorithm: LogReg})
}

func benchFit(b *testing.B, cfg Config) {
	const n, nf = 550000, 25
	x, y := synthetic(n, nf, 11)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := Fit(x, y, nf, cfg); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "rows/s")
	if cfg.Algorithm != LogReg {
		b.ReportMetric(float64(n)*float64(DefaultConfig().Trees)*float64(b.N)/b.Elapsed().Seconds(), "row-trees/s")
	}
	b.ReportMetric(b.Elapsed().Seconds()/float64(b.N), "s/fit")
}
