package sepsis2019

import (
	"bufio"
	"encoding/csv"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
)

// Alert thresholds of the scores (a row "predicts sepsis" when its score
// is at or above the threshold).
const (
	// ThresholdNEWS2 is NEWS2's "urgent response" trigger: an aggregate of
	// 5 or more (RCP 2017).
	ThresholdNEWS2 = 5
	// ThresholdMEWS is MEWS 5 or more: the trigger of Subbe et al. 2001
	// (QJM 94:521), whose MEWS >= 5 was associated with death and ICU
	// admission; the MEWS tables in use call for urgent review from 5.
	ThresholdMEWS = 5
	// ThresholdQSOFA is qSOFA 2 or more (Sepsis-3, Seymour et al. 2016).
	ThresholdQSOFA = 2
)

// CSVHeader returns the column names of the CSV WriteCSV writes.
func CSVHeader() []string {
	return []string{"patient", "iculos", "sepsis_label", "news2", "mews", "qsofa", "model"}
}

// ModelKind returns the model kind ("model:<name>") among kinds, or "".
func ModelKind(kinds []string) string {
	for _, k := range kinds {
		if strings.HasPrefix(k, modelPrefix) {
			return k
		}
	}
	return ""
}

// WriteCSV writes one line per input row of pts (in order):
// patient,iculos,sepsis_label,news2,mews,qsofa,model. A score column is
// empty where that kind had no score at or before the row (e.g. model when
// none is configured, mews/qsofa when the stream engine does not compute
// them). scores is PipelineResult.Scores for exactly pts; modelKind names
// the model's kind ("" for none).
func WriteCSV(w io.Writer, pts []*Patient, scores map[string][]float64, modelKind string) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	cw := csv.NewWriter(bw)
	header := CSVHeader()
	if err := cw.Write(header); err != nil {
		return fmt.Errorf("writing csv: %w", err)
	}
	cols := [][]float64{scores[KindNEWS2], scores[KindMEWS], scores[KindQSOFA], nil}
	if modelKind != "" {
		cols[3] = scores[modelKind]
	}
	rec := make([]string, len(header))
	i := 0
	for _, p := range pts {
		for _, r := range p.Rows {
			rec[0], rec[1] = p.ID, strconv.Itoa(r.ICULOS)
			rec[2] = "0"
			if r.Label {
				rec[2] = "1"
			}
			for k, col := range cols {
				rec[3+k] = ""
				if col != nil && !math.IsNaN(col[i]) {
					rec[3+k] = strconv.FormatFloat(col[i], 'g', -1, 64)
				}
			}
			if err := cw.Write(rec); err != nil {
				return fmt.Errorf("writing csv: %w", err)
			}
			i++
		}
	}
	cw.Flush()
	if err := cw.Error(); err != nil {
		return fmt.Errorf("writing csv: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("writing csv: %w", err)
	}
	return nil
}

// Eval is one score's figures on one set of patients.
type Eval struct {
	Kind      string
	Set       string
	Threshold float64
	Patients  int
	Rows      int
	// Unscored counts rows without a score of the kind (taken as 0).
	Unscored int
	AUROC    float64
	Utility  float64
}

// Evaluate computes the hourly AUROC and the normalised utility at
// threshold of values (one per row of all, in order; NaN is taken as 0: a
// patient with nothing observed scores 0) over the patients of all for
// which keep returns true (nil keeps all).
func Evaluate(kind, set string, all []*Patient, values []float64, threshold float64, keep func(*Patient) bool) (Eval, error) {
	e := Eval{Kind: kind, Set: set, Threshold: threshold}
	if n := CountRows(all); len(values) != n {
		return e, fmt.Errorf("evaluating %s: %d values for %d rows", kind, len(values), n)
	}
	var scores []float64
	var labels []bool
	u := UtilitySum{Params: OfficialUtility()}
	i := 0
	for _, p := range all {
		n := len(p.Rows)
		if keep != nil && !keep(p) {
			i += n
			continue
		}
		ls := make([]bool, n)
		preds := make([]bool, n)
		for j, r := range p.Rows {
			v := values[i+j]
			if math.IsNaN(v) {
				v = 0
				e.Unscored++
			}
			ls[j] = r.Label
			preds[j] = v >= threshold
			scores = append(scores, v)
			labels = append(labels, r.Label)
		}
		if err := u.Add(ls, preds); err != nil {
			return e, err
		}
		e.Patients++
		e.Rows += n
		i += n
	}
	var err error
	if e.AUROC, err = AUROC(scores, labels); err != nil {
		return e, err
	}
	e.Utility = u.Normalized()
	return e, nil
}

// WriteTable prints evals as an aligned table.
func WriteTable(w io.Writer, evals []Eval) error {
	bw := bufio.NewWriter(w)
	fmt.Fprintf(bw, "%-14s %-10s %-16s %9s %9s %8s %8s\n", "score", "alert at", "patients", "n", "rows", "AUROC", "utility")
	for _, e := range evals {
		fmt.Fprintf(bw, "%-14s %-10s %-16s %9d %9d %8.4f %8.4f\n", e.Kind, ">= "+strconv.FormatFloat(e.Threshold, 'g', 4, 64),
			e.Set, e.Patients, e.Rows, e.AUROC, e.Utility)
	}
	return bw.Flush()
}
