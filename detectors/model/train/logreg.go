package train

import (
	"fmt"
	"math"
)

// chunks is the fixed number of row blocks whose partial sums are added in
// order, so the result does not depend on the number of workers.
const chunks = 16

// fitLogReg fits L2-regularised logistic regression by Newton's method on
// standardised inputs (mean 0, standard deviation 1; constant columns get
// weight 0), then folds the standardisation into raw-input weights.
func fitLogReg(x []float32, y []float64, n, nf int, cfg Config) (*Model, error) {
	mean := make([]float64, nf)
	sd := make([]float64, nf)
	for i := 0; i < n; i++ {
		for j := 0; j < nf; j++ {
			mean[j] += float64(x[i*nf+j])
		}
	}
	for j := range mean {
		mean[j] /= float64(n)
	}
	for i := 0; i < n; i++ {
		for j := 0; j < nf; j++ {
			d := float64(x[i*nf+j]) - mean[j]
			sd[j] += d * d
		}
	}
	inv := make([]float64, nf) // 1/sd, 0 for constant columns
	for j := range sd {
		sd[j] = math.Sqrt(sd[j] / float64(n))
		if sd[j] > 1e-12 {
			inv[j] = 1 / sd[j]
		}
	}
	d := nf + 1 // weights then intercept
	w := make([]float64, d)
	var sp float64
	for _, v := range y {
		sp += v
	}
	w[nf] = math.Log(sp / (float64(n) - sp))

	type part struct {
		grad, hess []float64
		loss       float64
	}
	parts := make([]part, chunks)
	for c := range parts {
		parts[c] = part{grad: make([]float64, d), hess: make([]float64, d*d)}
	}
	// eval computes the mean loss (and, with derivs, gradient and Hessian)
	// at weights ww.
	eval := func(ww []float64, derivs bool) (float64, []float64, []float64) {
		chunk := (n + chunks - 1) / chunks
		parallel(chunks, cfg.Workers, func(c int) {
			p := &parts[c]
			clear(p.grad)
			clear(p.hess)
			p.loss = 0
			zs := make([]float64, d)
			lo, hi := c*chunk, min((c+1)*chunk, n)
			for i := lo; i < hi; i++ {
				s := ww[nf]
				for j := 0; j < nf; j++ {
					zs[j] = (float64(x[i*nf+j]) - mean[j]) * inv[j]
					s += ww[j] * zs[j]
				}
				zs[nf] = 1
				wt := 1.0
				if y[i] == 1 {
					wt = cfg.ScalePosWeight
				}
				// log(1+e^s) - y*s, computed stably.
				var l float64
				if s > 0 {
					l = s + math.Log1p(math.Exp(-s))
				} else {
					l = math.Log1p(math.Exp(s))
				}
				p.loss += wt * (l - y[i]*s)
				if !derivs {
					continue
				}
				pr := 1 / (1 + math.Exp(-s))
				gi := wt * (pr - y[i])
				hi := wt * max(pr*(1-pr), 1e-12)
				for a := 0; a < d; a++ {
					p.grad[a] += gi * zs[a]
					ha := hi * zs[a]
					row := p.hess[a*d:]
					for b := 0; b <= a; b++ {
						row[b] += ha * zs[b]
					}
				}
			}
		})
		loss := 0.0
		grad := make([]float64, d)
		hess := make([]float64, d*d)
		for c := range parts {
			loss += parts[c].loss
			if derivs {
				for a := range grad {
					grad[a] += parts[c].grad[a]
				}
				for a := range hess {
					hess[a] += parts[c].hess[a]
				}
			}
		}
		nn := float64(n)
		loss /= nn
		for j := 0; j < nf; j++ {
			loss += 0.5 * cfg.Lambda * ww[j] * ww[j]
		}
		if !derivs {
			return loss, nil, nil
		}
		for a := 0; a < d; a++ {
			grad[a] /= nn
			for b := 0; b <= a; b++ {
				hess[a*d+b] /= nn
				hess[b*d+a] = hess[a*d+b]
			}
		}
		for j := 0; j < nf; j++ {
			grad[j] += cfg.Lambda * ww[j]
			hess[j*d+j] += cfg.Lambda
		}
		for a := 0; a < d; a++ {
			hess[a*d+a] += 1e-10
		}
		return loss, grad, hess
	}

	loss, grad, hess := eval(w, true)
	next := make([]float64, d)
	for it := 0; it < cfg.MaxIter; it++ {
		step, err := cholSolve(hess, grad, d)
		if err != nil {
			return nil, fmt.Errorf("training logistic regression: iteration %d: %w", it, err)
		}
		// Damped Newton: halve the step until the loss does not rise.
		t := 1.0
		var nl float64
		for k := 0; k < 30; k++ {
			for a := range next {
				next[a] = w[a] - t*step[a]
			}
			nl, _, _ = eval(next, false)
			if nl <= loss {
				break
			}
			t /= 2
		}
		maxStep := 0.0
		for a := range w {
			maxStep = max(maxStep, math.Abs(next[a]-w[a]))
		}
		copy(w, next)
		if maxStep < cfg.Tol {
			break
		}
		loss, grad, hess = eval(w, true)
	}

	m := &Model{Algorithm: LogReg, NFeatures: nf, Weights: make([]float32, nf), Importance: make([]float64, nf), Config: cfg}
	bias := w[nf]
	for j := 0; j < nf; j++ {
		m.Weights[j] = float32(w[j] * inv[j])
		bias -= w[j] * inv[j] * mean[j]
		m.Importance[j] = math.Abs(w[j])
	}
	m.Bias = float32(bias)
	return m, nil
}

// cholSolve solves A s = b for a symmetric positive definite d x d matrix A
// (row-major) by Cholesky decomposition. Hand-written: a 26 x 26 solve does
// not justify a linear-algebra dependency.
func cholSolve(a, b []float64, d int) ([]float64, error) {
	l := make([]float64, d*d)
	for i := 0; i < d; i++ {
		for j := 0; j <= i; j++ {
			s := a[i*d+j]
			for k := 0; k < j; k++ {
				s -= l[i*d+k] * l[j*d+k]
			}
			if i == j {
				if !(s > 0) {
					return nil, fmt.Errorf("hessian is not positive definite at column %d", i)
				}
				l[i*d+i] = math.Sqrt(s)
			} else {
				l[i*d+j] = s / l[j*d+j]
			}
		}
	}
	z := make([]float64, d)
	for i := 0; i < d; i++ {
		s := b[i]
		for k := 0; k < i; k++ {
			s -= l[i*d+k] * z[k]
		}
		z[i] = s / l[i*d+i]
	}
	s := make([]float64, d)
	for i := d - 1; i >= 0; i-- {
		v := z[i]
		for k := i + 1; k < d; k++ {
			v -= l[k*d+i] * s[k]
		}
		s[i] = v / l[i*d+i]
	}
	return s, nil
}
