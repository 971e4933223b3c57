package alerting

import (
	"testing"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// TestHoldsAgreesWithCheck: every NEWS2 rule's Holds answers as its Check
// does, on real scores across the bands (with and without a red single
// parameter) and on hand-made edge values.
func TestHoldsAgreesWithCheck(t *testing.T) {
	scores := []*vigilv1.Score{score(t0, well), score(t0, four), score(t0, ten), score(t0, six), score(t0, redSat)}
	for v := 0.0; v <= 20; v += 0.5 {
		for _, red := range []bool{false, true} {
			scores = append(scores, &vigilv1.Score{Kind: "news2", Value: v, SingleParameterRed: red})
		}
	}
	for _, r := range NEWS2Rules() {
		if r.Holds == nil {
			t.Fatalf("rule %s has no Holds", r.Name)
		}
		for _, s := range scores {
			want, _, _ := r.Check(s)
			if got := r.Holds(s); got != want {
				t.Errorf("rule %s on aggregate %v (single red %v): Holds %v, Check %v", r.Name, s.GetValue(), s.GetSingleParameterRed(), got, want)
			}
		}
	}
}

// TestEvaluateUnchangedAllocatesNothing: a score that opens and resolves
// no alert (a well patient scored again, or one whose alert stays open)
// costs Evaluate no allocation, and still returns no events.
func TestEvaluateUnchangedAllocatesNothing(t *testing.T) {
	e := New(NEWS2Rules())
	for _, tc := range []struct {
		name  string
		vital map[string]float64
		open  int
	}{{"well", well, 0}, {"aggregate alert stays open", ten, 1}, {"single-parameter alert stays open", redSat, 1}} {
		var st State
		e.Evaluate(&st, score(t0, tc.vital), Trigger{})
		if len(st.Open) != tc.open {
			t.Fatalf("%s: %d open alerts, want %d", tc.name, len(st.Open), tc.open)
		}
		s := score(t0+60_000, tc.vital)
		if evs := e.Evaluate(&st, s, Trigger{}); len(evs) != 0 {
			t.Fatalf("%s: re-evaluating gave %d events, want none", tc.name, len(evs))
		}
		if raceEnabled {
			continue
		}
		if n := testing.AllocsPerRun(100, func() { e.Evaluate(&st, s, Trigger{}) }); n != 0 {
			t.Errorf("%s: Evaluate allocates %v times per unchanged score, want 0", tc.name, n)
		}
	}
}
