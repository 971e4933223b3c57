package sepsis2019

import (
	"fmt"
	"math"
	"slices"

	"github.com/vigilhealth/vigil/detectors/model/train"
)

// UtilityParams are the parameters of the challenge's utility function.
type UtilityParams struct {
	// DtEarly, DtOptimal and DtLate are hours relative to t_sepsis: a
	// positive prediction earns nothing (and costs UFP) before
	// t_sepsis+DtEarly, rises to MaxUTP at t_sepsis+DtOptimal and falls
	// back to 0 at t_sepsis+DtLate; a missed hour costs from 0 at
	// t_sepsis+DtOptimal down to MinUFN at t_sepsis+DtLate.
	DtEarly, DtOptimal, DtLate int
	MaxUTP, MinUFN, UFP, UTN   float64
}

// OfficialUtility returns the parameters of the challenge's
// evaluate_sepsis_score.py: dt_early=-12, dt_optimal=-6, dt_late=3,
// max_u_tp=1, min_u_fn=-2, u_fp=-0.05, u_tn=0.
func OfficialUtility() UtilityParams {
	return UtilityParams{DtEarly: -12, DtOptimal: -6, DtLate: 3, MaxUTP: 1, MinUFN: -2, UFP: -0.05, UTN: 0}
}

// PatientUtility is compute_prediction_utility of the challenge's
// evaluate_sepsis_score.py for one patient: labels and predictions are
// per row (row index t = 0, 1, ...; the index, not ICULOS, is the time
// axis, as in the official code). A septic patient (any label 1) has
// t_sepsis = (index of the first label 1) - DtOptimal, i.e. 6 rows after
// it, since the labels are already shifted 6 h early. Then, for every row
// t <= t_sepsis + DtLate (all rows of a non-septic patient, whose
// t_sepsis is +inf):
//   - septic, predicted: t <= t_sepsis+DtOptimal scores
//     max(m1*(t-t_sepsis)+b1, UFP), later rows m2*(t-t_sepsis)+b2;
//   - not septic, predicted: UFP;
//   - septic, not predicted: 0 up to t_sepsis+DtOptimal, then
//     m3*(t-t_sepsis)+b3;
//   - not septic, not predicted: UTN;
//
// with the lines m1 = MaxUTP/(DtOptimal-DtEarly), b1 = -m1*DtEarly;
// m2 = -MaxUTP/(DtLate-DtOptimal), b2 = -m2*DtLate;
// m3 = MinUFN/(DtLate-DtOptimal), b3 = -m3*DtOptimal. Rows after
// t_sepsis+DtLate score 0. It fails when the lengths differ.
func PatientUtility(labels, predictions []bool, u UtilityParams) (float64, error) {
	if len(labels) != len(predictions) {
		return 0, fmt.Errorf("utility: %d labels but %d predictions", len(labels), len(predictions))
	}
	septic := false
	tSepsis := math.Inf(1)
	if i := slices.Index(labels, true); i >= 0 {
		septic = true
		tSepsis = float64(i - u.DtOptimal)
	}
	dtEarly, dtOptimal, dtLate := float64(u.DtEarly), float64(u.DtOptimal), float64(u.DtLate)
	m1 := u.MaxUTP / (dtOptimal - dtEarly)
	b1 := -m1 * dtEarly
	m2 := -u.MaxUTP / (dtLate - dtOptimal)
	b2 := -m2 * dtLate
	m3 := u.MinUFN / (dtLate - dtOptimal)
	b3 := -m3 * dtOptimal
	var sum float64
	for i, pred := range predictions {
		t := float64(i)
		if t > tSepsis+dtLate {
			continue
		}
		var v float64
		switch {
		case septic && pred:
			if t <= tSepsis+dtOptimal {
				v = max(m1*(t-tSepsis)+b1, u.UFP)
			} else {
				v = m2*(t-tSepsis) + b2
			}
		case !septic && pred:
			v = u.UFP
		case septic && !pred:
			if t > tSepsis+dtOptimal {
				v = m3*(t-tSepsis) + b3
			}
		default:
			v = u.UTN
		}
		sum += v
	}
	return sum, nil
}

// UtilitySum accumulates the challenge's utilities over patients, as
// evaluate_sepsis_score.py does: the observed predictions, the best ones
// (1 exactly from t_sepsis+DtEarly to t_sepsis+DtLate of septic patients,
// clipped to the stay, else 0), the worst (the opposite of the best) and
// inaction (never predicting). Not safe for concurrent use.
type UtilitySum struct {
	Params                          UtilityParams
	Observed, Best, Worst, Inaction float64
	Patients                        int
}

// Add adds one patient.
func (s *UtilitySum) Add(labels, predictions []bool) error {
	u := s.Params
	n := len(labels)
	best := make([]bool, n)
	if i := slices.Index(labels, true); i >= 0 {
		tSepsis := i - u.DtOptimal
		for t := max(0, tSepsis+u.DtEarly); t < min(tSepsis+u.DtLate+1, n); t++ {
			best[t] = true
		}
	}
	worst := make([]bool, n)
	for i, b := range best {
		worst[i] = !b
	}
	observed, err := PatientUtility(labels, predictions, u)
	if err != nil {
		return err
	}
	bestU, _ := PatientUtility(labels, best, u)
	worstU, _ := PatientUtility(labels, worst, u)
	inaction, _ := PatientUtility(labels, make([]bool, n), u)
	s.Observed += observed
	s.Best += bestU
	s.Worst += worstU
	s.Inaction += inaction
	s.Patients++
	return nil
}

// Normalized is the challenge's normalised utility:
// (observed - inaction) / (best - inaction), summed over the patients
// before dividing; 1 for the best predictions, 0 for never predicting.
// NaN when best equals inaction (no septic patient).
func (s *UtilitySum) Normalized() float64 {
	d := s.Best - s.Inaction
	if d == 0 {
		return math.NaN()
	}
	return (s.Observed - s.Inaction) / d
}

// AUROC is the area under the ROC curve of scores against labels: the
// Mann-Whitney statistic P(score of a positive > score of a negative) +
// 0.5 P(equal), from mid-ranks (train.AUROC, the one the trainer reports).
// NaN when there is no positive or no negative. It fails when the lengths
// differ or a score is NaN.
func AUROC(scores []float64, labels []bool) (float64, error) {
	if len(scores) != len(labels) {
		return 0, fmt.Errorf("auroc: %d scores but %d labels", len(scores), len(labels))
	}
	y := make([]float64, len(labels))
	for i, l := range labels {
		if math.IsNaN(scores[i]) {
			return 0, fmt.Errorf("auroc: score %d is NaN", i)
		}
		if l {
			y[i] = 1
		}
	}
	return train.AUROC(scores, y), nil
}
