package sepsis2019

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// septic returns labels of n rows whose first label 1 is at row first
// (t_sepsis = first + 6), 1 from there on, as the challenge's files have.
func septic(n, first int) []bool {
	ls := make([]bool, n)
	for i := first; i < n; i++ {
		ls[i] = true
	}
	return ls
}

// predictRows predicts 1 at rows lo..hi inclusive of n rows.
func predictRows(n, lo, hi int) []bool {
	ps := make([]bool, n)
	for i := max(lo, 0); i <= hi && i < n; i++ {
		ps[i] = true
	}
	return ps
}

// The cases follow evaluate_sepsis_score.py with dt_early=-12,
// dt_optimal=-6, dt_late=3, max_u_tp=1, min_u_fn=-2, u_fp=-0.05, u_tn=0:
// the lines are m1 = 1/6, b1 = 2 (TP up to t_sepsis-6, floored at -0.05);
// m2 = -1/9, b2 = 1/3 (TP after t_sepsis-6); m3 = -2/9, b3 = -4/3 (FN after
// t_sepsis-6); rows after t_sepsis+3 count 0. Every septic patient below
// has 20 rows with the first label 1 at row 10, so t_sepsis = 16, the
// optimal window is rows 4..19 and u(t) is written with d = t - 16.
func TestPatientUtilityHandBuilt(t *testing.T) {
	u := OfficialUtility()
	// Missed rows 11..19 (d = -5..3) cost -2/9*d - 4/3 = -2/9, -4/9, ...,
	// -18/9: together -(2+4+...+18)/9 = -90/9 = -10. Rows up to 10 cost 0.
	const missed = -10.0
	cases := []struct {
		name   string
		labels []bool
		preds  []bool
		want   float64
	}{
		{
			// Alarm from row 4 (d = -12, the earliest credited hour) on:
			// row 4 earns max(-12/6+2, -0.05) = 0; rows 5..10 (d = -11..-6)
			// earn d/6+2 = 1/6..6/6, together 21/6 = 3.5; rows 11..19
			// (d = -5..3) earn -d/9+1/3 = 8/9..0, together 36/9 = 4.
			// Rows 0..3 are not predicted: FN before t_sepsis-6 is 0.
			name: "early", labels: septic(20, 10), preds: predictRows(20, 4, 19), want: 7.5,
		},
		{
			// Alarm from row 10 (d = -6): row 10 earns 1, rows 11..19
			// earn 4 as above.
			name: "optimal", labels: septic(20, 10), preds: predictRows(20, 10, 19), want: 5,
		},
		{
			// Alarm from row 18 (d = 2): rows 18, 19 earn 1/9 and 0;
			// rows 11..17 (d = -5..1) are missed: -(2+4+...+14)/9 = -56/9.
			name: "late", labels: septic(20, 10), preds: predictRows(20, 18, 19), want: 1.0/9 - 56.0/9,
		},
		{
			name: "missed", labels: septic(20, 10), preds: make([]bool, 20), want: missed,
		},
		{
			// Non-septic: each alarm costs u_fp = -0.05, silence u_tn = 0.
			name: "false alarms", labels: make([]bool, 10), preds: predictRows(10, 2, 4), want: -0.15,
		},
		{
			// Alarm on every row of a 25-row stay: rows 0..3 (d = -16..-13)
			// earn d/6+2 < -0.05, floored at -0.05 each (-0.2); row 4: 0;
			// rows 5..19: 3.5 + 4; rows 20..24 are after t_sepsis+3: 0.
			name: "always", labels: septic(25, 10), preds: predictRows(25, 0, 24), want: 7.3,
		},
	}
	for _, c := range cases {
		got, err := PatientUtility(c.labels, c.preds, u)
		if err != nil {
			t.Fatal(err)
		}
		if math.Abs(got-c.want) > 1e-12 {
			t.Errorf("%s: utility %v, want %v", c.name, got, c.want)
		}
	}
	if _, err := PatientUtility(make([]bool, 3), make([]bool, 2), u); err == nil {
		t.Error("labels and predictions of different lengths were accepted")
	}
}

// The normalised utility sums over patients before dividing: a septic
// patient alarmed at the optimal time (5; best 7.5 = the "early" alarm
// from t_sepsis-12; inaction -10) and a non-septic one with 3 false alarms
// (-0.15; best and inaction 0) give (4.85 + 10) / (7.5 + 10).
func TestNormalizedUtility(t *testing.T) {
	s := UtilitySum{Params: OfficialUtility()}
	if err := s.Add(septic(20, 10), predictRows(20, 10, 19)); err != nil {
		t.Fatal(err)
	}
	if err := s.Add(make([]bool, 10), predictRows(10, 2, 4)); err != nil {
		t.Fatal(err)
	}
	if math.Abs(s.Observed-4.85) > 1e-12 || s.Best != 7.5 || s.Inaction != -10 {
		t.Fatalf("sums observed %v best %v inaction %v, want 4.85, 7.5, -10", s.Observed, s.Best, s.Inaction)
	}
	// Worst predicts outside the best window only: rows 0..3 of the septic
	// patient (4 × -0.05) and every row of the other (10 × -0.05), and
	// misses the septic rows (-10).
	if math.Abs(s.Worst-(-0.2-10-0.5)) > 1e-12 {
		t.Errorf("worst %v, want -10.7", s.Worst)
	}
	if got, want := s.Normalized(), 14.85/17.5; math.Abs(got-want) > 1e-12 {
		t.Errorf("normalised %v, want %v", got, want)
	}
	// The best predictions score 1, never predicting 0.
	b := UtilitySum{Params: OfficialUtility()}
	_ = b.Add(septic(20, 10), predictRows(20, 4, 19))
	_ = b.Add(make([]bool, 10), make([]bool, 10))
	n := UtilitySum{Params: OfficialUtility()}
	_ = n.Add(septic(20, 10), make([]bool, 20))
	if b.Normalized() != 1 || n.Normalized() != 0 {
		t.Errorf("best %v (want 1), inaction %v (want 0)", b.Normalized(), n.Normalized())
	}
	// A first label in row 0: t_sepsis = 6, the best window starts at row
	// 0 (clipped from -6) and ends at row 9 of a 12-row stay.
	c := UtilitySum{Params: OfficialUtility()}
	_ = c.Add(septic(12, 0), predictRows(12, 0, 9))
	if c.Observed != c.Best {
		t.Errorf("clipped best window: observed %v != best %v", c.Observed, c.Best)
	}
}

// bruteAUROC counts every positive/negative pair: 1 when the positive
// scores higher, 1/2 for a tie.
func bruteAUROC(scores []float64, labels []bool) float64 {
	var wins, pairs float64
	for i := range scores {
		if !labels[i] {
			continue
		}
		for j := range scores {
			if labels[j] {
				continue
			}
			pairs++
			switch {
			case scores[i] > scores[j]:
				wins++
			case scores[i] == scores[j]:
				wins += 0.5
			}
		}
	}
	return wins / pairs
}

func TestAUROCMatchesPairwise(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for trial := range 50 {
		n := 2 + r.IntN(300)
		scores := make([]float64, n)
		labels := make([]bool, n)
		for i := range scores {
			// Few distinct values: many ties, as integer scores have.
			scores[i] = float64(r.IntN(1 + trial%12))
			labels[i] = r.Float64() < 0.3
		}
		labels[0], labels[1] = true, false
		got, err := AUROC(scores, labels)
		if err != nil {
			t.Fatal(err)
		}
		if want := bruteAUROC(scores, labels); math.Abs(got-want) > 1e-12 {
			t.Fatalf("trial %d: AUROC %v, pairwise %v", trial, got, want)
		}
	}
	if v, _ := AUROC([]float64{1, 2}, []bool{true, true}); !math.IsNaN(v) {
		t.Errorf("AUROC without negatives = %v, want NaN", v)
	}
	if v, _ := AUROC([]float64{1, 2, 3}, []bool{false, true, true}); v != 1 {
		t.Errorf("perfectly separated AUROC = %v, want 1", v)
	}
}

func TestSplit(t *testing.T) {
	var ps []*Patient
	for i := range 1000 {
		ps = append(ps, &Patient{ID: fmt.Sprintf("p%06d", 100001+i)})
	}
	train, test := Split(ps, DefaultSeed)
	if len(train) != 700 || len(test) != 300 {
		t.Fatalf("split %d/%d, want 700/300", len(train), len(test))
	}
	seen := map[string]bool{}
	for _, p := range append(append([]*Patient{}, train...), test...) {
		if seen[p.ID] {
			t.Fatalf("%s in both parts", p.ID)
		}
		seen[p.ID] = true
	}
	// The input order does not matter; the seed does.
	rev := make([]*Patient, len(ps))
	for i, p := range ps {
		rev[len(ps)-1-i] = p
	}
	_, test2 := Split(rev, DefaultSeed)
	_, test3 := Split(ps, DefaultSeed+1)
	same := func(a, b []*Patient) bool {
		for i := range a {
			if a[i].ID != b[i].ID {
				return false
			}
		}
		return true
	}
	if !same(test, test2) {
		t.Error("the split depends on the order of the patients")
	}
	if same(test, test3) {
		t.Error("another seed gives the same split")
	}
}
