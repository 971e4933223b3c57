package train

import (
	"math"
	"slices"
	"sort"
	"strconv"
)

// AUROC is the area under the ROC curve of scores p for labels y (0/1),
// ties counted half (Mann-Whitney). It is NaN when y holds one class only.
func AUROC(p, y []float64) float64 {
	idx := make([]int, len(p))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return p[idx[a]] < p[idx[b]] })
	var rankSum, npos float64
	for i := 0; i < len(idx); {
		j := i
		for j < len(idx) && p[idx[j]] == p[idx[i]] {
			j++
		}
		avg := float64(i+j+1) / 2
		for k := i; k < j; k++ {
			if y[idx[k]] == 1 {
				rankSum += avg
				npos++
			}
		}
		i = j
	}
	nneg := float64(len(p)) - npos
	if npos == 0 || nneg == 0 {
		return math.NaN()
	}
	return (rankSum - npos*(npos+1)/2) / (npos * nneg)
}

// LogLoss is the mean binary cross-entropy of probabilities p for labels
// y, with p clipped to [1e-15, 1-1e-15].
func LogLoss(p, y []float64) float64 {
	var s float64
	for i, v := range p {
		v = min(max(v, 1e-15), 1-1e-15)
		s -= y[i]*math.Log(v) + (1-y[i])*math.Log(1-v)
	}
	return s / float64(len(p))
}

// YoudenThreshold returns the probability threshold (predict positive at or
// above it) that maximises sensitivity + specificity - 1 on p and y.
func YoudenThreshold(p, y []float64) float64 {
	idx := make([]int, len(p))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return p[idx[a]] > p[idx[b]] })
	var npos, nneg float64
	for _, v := range y {
		if v == 1 {
			npos++
		} else {
			nneg++
		}
	}
	if npos == 0 || nneg == 0 {
		return 0.5
	}
	best, thr := -1.0, 0.5
	var tp, fp float64
	for i := 0; i < len(idx); {
		j := i
		for j < len(idx) && p[idx[j]] == p[idx[i]] {
			if y[idx[j]] == 1 {
				tp++
			} else {
				fp++
			}
			j++
		}
		if jv := tp/npos - fp/nneg; jv > best {
			best, thr = jv, p[idx[i]]
		}
		i = j
	}
	return thr
}

// Reference bins values for the drift reference of a model input: up to
// bins-1 edges at evenly spaced quantiles (deduplicated) and the share of
// values in each of the len(edges)+1 bins, bin i holding
// edges[i-1] <= v < edges[i]. values is not modified.
func Reference(values []float32, bins int) (edges, proportions []float64) {
	if len(values) == 0 || bins < 2 {
		return nil, nil
	}
	s := slices.Clone(values)
	slices.Sort(s)
	for k := 1; k < bins; k++ {
		v := short(s[k*len(s)/bins])
		if v > short(s[0]) && (len(edges) == 0 || v > edges[len(edges)-1]) {
			edges = append(edges, v)
		}
	}
	if len(edges) == 0 {
		return nil, nil // a constant input: no drift reference
	}
	counts := make([]float64, len(edges)+1)
	for _, v := range s {
		b := sort.SearchFloat64s(edges, short(v)) // first edge >= v
		if b < len(edges) && edges[b] == short(v) {
			b++ // v == edge belongs to the bin above it
		}
		counts[b]++
	}
	proportions = make([]float64, len(counts))
	for i, c := range counts {
		proportions[i] = c / float64(len(s))
	}
	return edges, proportions
}

// short is the float64 with the shortest decimal form that rounds to v's
// float32 (36.6 rather than 36.599998474121094), for readable manifests.
func short(v float32) float64 {
	f, _ := strconv.ParseFloat(strconv.FormatFloat(float64(v), 'g', -1, 32), 64)
	return f
}
