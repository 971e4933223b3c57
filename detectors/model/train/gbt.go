package train

import (
	"math"
	"math/rand/v2"
	"slices"
	"sync"
)

// binned holds the features quantised to uint8 bins, column-major
// (bins[f*n+i] is row i of feature f), with the float32 upper edges: a value
// v falls in the first bin b with v <= edges[f][b], or in the last bin
// (len(edges[f])) when it exceeds every edge. A split "bin <= b" is therefore
// exactly "v <= edges[f][b]" in float32, which is what the exported tree and
// Predict evaluate.
type binned struct {
	n, f  int
	bins  []uint8
	edges [][]float32
	// off[f] is the first histogram slot of feature f; off[f+1]-off[f] is
	// its number of bins.
	off []int
}

// binSample bounds the rows whose values choose the bin edges.
const binSample = 200000

func binFeatures(x []float32, n, nf, maxBins, workers int) *binned {
	b := &binned{n: n, f: nf, bins: make([]uint8, n*nf), edges: make([][]float32, nf), off: make([]int, nf+1)}
	parallel(nf, workers, func(f int) {
		col := make([]float32, n)
		for i := 0; i < n; i++ {
			col[i] = x[i*nf+f]
		}
		// Edges from at most binSample rows (every k-th, deterministic),
		// as LightGBM does: quantiles of 200k values are as good as of all.
		sorted := col
		if n > binSample {
			step := (n + binSample - 1) / binSample
			sorted = make([]float32, 0, n/step+1)
			for i := 0; i < n; i += step {
				sorted = append(sorted, col[i])
			}
		} else {
			sorted = slices.Clone(col)
		}
		slices.Sort(sorted)
		b.edges[f] = edgesOf(sorted, maxBins)
		e := b.edges[f]
		dst := b.bins[f*n : (f+1)*n]
		for i, v := range col {
			// First edge >= v (edges are few, binary search is cheap).
			lo, hi := 0, len(e)
			for lo < hi {
				m := (lo + hi) / 2
				if e[m] < v {
					lo = m + 1
				} else {
					hi = m
				}
			}
			dst[i] = uint8(lo)
		}
	})
	for f := 0; f < nf; f++ {
		b.off[f+1] = b.off[f] + len(b.edges[f]) + 1
	}
	return b
}

// edgesOf picks at most maxBins-1 upper bin edges from sorted values: every
// distinct value but the largest when there are few, otherwise values at
// evenly spaced ranks (deduplicated, so a heavily repeated value such as a
// fill value gets a bin of its own).
func edgesOf(sorted []float32, maxBins int) []float32 {
	var distinct []float32
	for i, v := range sorted {
		if i == 0 || v != sorted[i-1] {
			distinct = append(distinct, v)
			if len(distinct) > maxBins {
				break
			}
		}
	}
	if len(distinct) <= maxBins {
		return distinct[:len(distinct)-1]
	}
	n := len(sorted)
	edges := make([]float32, 0, maxBins-1)
	for k := 1; k < maxBins; k++ {
		v := sorted[(k*n)/maxBins-1]
		if len(edges) == 0 || v > edges[len(edges)-1] {
			edges = append(edges, v)
		}
	}
	if edges[len(edges)-1] == sorted[n-1] {
		edges = edges[:len(edges)-1]
	}
	return edges
}

// parallel runs fn(0..n-1) on up to workers goroutines and waits. Each index
// runs on exactly one goroutine, so results written per index are
// deterministic.
func parallel(n, workers int, fn func(i int)) {
	if workers <= 1 || n <= 1 {
		for i := 0; i < n; i++ {
			fn(i)
		}
		return
	}
	if workers > n {
		workers = n
	}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; i < n; i += workers {
				fn(i)
			}
		}(w)
	}
	wg.Wait()
}

// parallelRange splits [0, n) into contiguous chunks, one per worker.
func parallelRange(n, workers int, fn func(lo, hi int)) {
	if workers <= 1 || n < 4096 {
		fn(0, n)
		return
	}
	var wg sync.WaitGroup
	chunk := (n + workers - 1) / workers
	for lo := 0; lo < n; lo += chunk {
		hi := min(lo+chunk, n)
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(lo, hi)
		}()
	}
	wg.Wait()
}

// leafState is a leaf of the tree being grown: its rows (a segment of the
// row index array), gradient sums, histogram and best split.
type leafState struct {
	node       int32
	start, end int
	depth      int
	g, h       float64
	hist       []float64 // 2 per bin: gradient, hessian
	// best split
	gain     float64
	feature  int
	bin      int
	gl, hl   float64
	hasSplit bool
}

type grower struct {
	cfg  Config
	b    *binned
	grad []float64
	hess []float64
	// gg, hh are scratch: the gradients of one leaf's rows, in row order.
	gg, hh  []float64
	rows    []int32
	tmp     []int32
	allowed []bool
	nodes   []Node
	// splitBin[k] is the split bin of inner node k of the tree being grown.
	splitBin []uint8
	gains    []float64 // per feature, accumulated importance
}

func fitGBT(x []float32, y []float64, n, nf int, cfg Config) (*Model, error) {
	b := binFeatures(x, n, nf, cfg.Bins, cfg.Workers)

	// Base score: the (weighted) log-odds of the positive rate.
	var sp, sw float64
	for _, v := range y {
		w := 1.0
		if v == 1 {
			w = cfg.ScalePosWeight
		}
		sp += w * v
		sw += w
	}
	base := float32(math.Log(sp / (sw - sp)))

	m := &Model{Algorithm: GBT, NFeatures: nf, Base: base, Importance: make([]float64, nf), Config: cfg}
	// margin holds each row's running float32 tree sum (without Base), the
	// exact value Predict computes.
	margin := make([]float32, n)
	g := &grower{
		cfg: cfg, b: b,
		grad: make([]float64, n), hess: make([]float64, n),
		gg: make([]float64, n), hh: make([]float64, n),
		rows: make([]int32, 0, n), tmp: make([]int32, n),
		allowed: make([]bool, nf), gains: m.Importance,
	}
	rng := rand.New(rand.NewPCG(uint64(cfg.Seed), 0x5eed_7ee5))
	perm := make([]int, nf)
	for t := 0; t < cfg.Trees; t++ {
		parallelRange(n, cfg.Workers, func(lo, hi int) {
			for i := lo; i < hi; i++ {
				p := sigmoid(float64(margin[i] + base))
				w := 1.0
				if y[i] == 1 {
					w = cfg.ScalePosWeight
				}
				g.grad[i] = w * (p - y[i])
				g.hess[i] = w * max(p*(1-p), 1e-16)
			}
		})
		// Row subsample (without replacement, by a Bernoulli draw per row).
		g.rows = g.rows[:0]
		for i := 0; i < n; i++ {
			if cfg.Subsample >= 1 || rng.Float64() < cfg.Subsample {
				g.rows = append(g.rows, int32(i))
			}
		}
		if len(g.rows) == 0 {
			g.rows = append(g.rows, int32(rng.IntN(n)))
		}
		// Column subsample.
		k := max(1, int(math.Round(cfg.ColSample*float64(nf))))
		for j := range perm {
			perm[j] = j
		}
		rng.Shuffle(nf, func(i, j int) { perm[i], perm[j] = perm[j], perm[i] })
		for j := range g.allowed {
			g.allowed[j] = false
		}
		for _, j := range perm[:k] {
			g.allowed[j] = true
		}

		tree := g.grow()
		m.Trees = append(m.Trees, tree)
		splitBin := g.splitBin
		// Update every row's margin by walking the binned tree (same
		// decisions as the float32 thresholds, see binned).
		parallelRange(n, cfg.Workers, func(lo, hi int) {
			for i := lo; i < hi; i++ {
				margin[i] += tree.leafBinned(b, splitBin, i)
			}
		})
	}
	return m, nil
}

// leafBinned walks tree t for training row i on its bins; splitBin[k] is
// the bin index of inner node k (its threshold is edges[feature][bin]).
func (t *Tree) leafBinned(b *binned, splitBin []uint8, row int) float32 {
	i := int32(0)
	for {
		nd := &t.Nodes[i]
		if nd.Left < 0 {
			return nd.Value
		}
		if b.bins[int(nd.Feature)*b.n+row] <= splitBin[i] {
			i = nd.Left
		} else {
			i = nd.Right
		}
	}
}

func (g *grower) leafValue(gs, hs float64) float32 {
	return float32(-gs / (hs + g.cfg.L2) * g.cfg.LearningRate)
}

// grow builds one tree best-first on g.rows.
func (g *grower) grow() Tree {
	g.nodes = g.nodes[:0]
	g.splitBin = g.splitBin[:0]
	nbins := g.b.off[g.b.f]
	root := &leafState{node: 0, start: 0, end: len(g.rows), hist: make([]float64, 2*nbins)}
	for _, r := range g.rows {
		root.g += g.grad[r]
		root.h += g.hess[r]
	}
	g.nodes = append(g.nodes, Node{Left: -1, Right: -1, Value: g.leafValue(root.g, root.h)})
	g.splitBin = append(g.splitBin, 0)
	g.buildHist(root)
	g.bestSplit(root)
	leaves := []*leafState{root}
	for len(leaves) < g.cfg.MaxLeaves {
		// The leaf with the largest gain (lowest node id on ties).
		bi := -1
		for i, l := range leaves {
			if l.hasSplit && (bi < 0 || l.gain > leaves[bi].gain) {
				bi = i
			}
		}
		if bi < 0 {
			break
		}
		l := leaves[bi]
		left, right := g.split(l)
		leaves[bi] = left
		leaves = append(leaves, right)
	}
	// Trees may reach MaxLeaves with splits left; leaf values are already set.
	return Tree{Nodes: slices.Clone(g.nodes)}
}

// split turns leaf l into an inner node with two new leaves, partitioning
// its rows (stable) and computing the smaller child's histogram by a scan
// and the larger one's by subtraction.
func (g *grower) split(l *leafState) (*leafState, *leafState) {
	b := g.b
	f := l.feature
	thr := b.edges[f][l.bin]
	col := b.bins[f*b.n : (f+1)*b.n]
	seg := g.rows[l.start:l.end]
	nl := 0
	nr := 0
	for _, r := range seg {
		if int(col[r]) <= l.bin {
			seg[nl] = r
			nl++
		} else {
			g.tmp[nr] = r
			nr++
		}
	}
	copy(seg[nl:], g.tmp[:nr])

	li := int32(len(g.nodes))
	ri := li + 1
	g.nodes[l.node] = Node{Feature: int32(f), Threshold: thr, Left: li, Right: ri}
	g.splitBin[l.node] = uint8(l.bin)
	g.splitBin = append(g.splitBin, 0, 0)
	g.gains[f] += l.gain
	left := &leafState{node: li, start: l.start, end: l.start + nl, depth: l.depth + 1, g: l.gl, h: l.hl}
	right := &leafState{node: ri, start: l.start + nl, end: l.end, depth: l.depth + 1, g: l.g - l.gl, h: l.h - l.hl}
	g.nodes = append(g.nodes,
		Node{Left: -1, Right: -1, Value: g.leafValue(left.g, left.h)},
		Node{Left: -1, Right: -1, Value: g.leafValue(right.g, right.h)})

	canSplit := l.depth+1 < g.cfg.MaxDepth
	if canSplit {
		small, large := left, right
		if nl > nr {
			small, large = right, left
		}
		small.hist = make([]float64, len(l.hist))
		g.buildHist(small)
		large.hist = l.hist // reuse the parent's buffer: parent - small
		for i, v := range small.hist {
			large.hist[i] -= v
		}
		g.bestSplit(small)
		g.bestSplit(large)
	}
	l.hist = nil
	return left, right
}

// buildHist sums gradients and hessians of the leaf's rows per feature bin,
// one feature per goroutine at a time (deterministic). The leaf's gradients
// are first gathered into contiguous scratch so that each feature pass reads
// them sequentially and only the bin column at random.
func (g *grower) buildHist(l *leafState) {
	b := g.b
	seg := g.rows[l.start:l.end]
	gg, hh := g.gg[:len(seg)], g.hh[:len(seg)]
	for k, r := range seg {
		gg[k] = g.grad[r]
		hh[k] = g.hess[r]
	}
	parallel(b.f, g.cfg.Workers, func(f int) {
		if !g.allowed[f] {
			return
		}
		col := b.bins[f*b.n : (f+1)*b.n]
		h := l.hist[2*b.off[f] : 2*b.off[f+1]]
		for k, r := range seg {
			i := 2 * int(col[r])
			h[i] += gg[k]
			h[i+1] += hh[k]
		}
	})
}

// bestSplit scans every allowed feature's histogram for the split with the
// largest gain that leaves both children at least MinChildWeight hessian.
func (g *grower) bestSplit(l *leafState) {
	l.hasSplit = false
	if l.end-l.start < 2 || l.h < 2*g.cfg.MinChildWeight {
		return
	}
	lam := g.cfg.L2
	parent := l.g * l.g / (l.h + lam)
	best := g.cfg.MinSplitGain
	minW := max(g.cfg.MinChildWeight, 1e-9)
	b := g.b
	for f := 0; f < b.f; f++ {
		if !g.allowed[f] {
			continue
		}
		h := l.hist[2*b.off[f] : 2*b.off[f+1]]
		nb := len(h) / 2
		var gl, hl float64
		for k := 0; k < nb-1; k++ {
			gl += h[2*k]
			hl += h[2*k+1]
			if hl < minW {
				continue
			}
			hr := l.h - hl
			if hr < minW {
				break
			}
			gr := l.g - gl
			gain := 0.5 * (gl*gl/(hl+lam) + gr*gr/(hr+lam) - parent)
			if gain > best {
				best = gain
				l.hasSplit = true
				l.feature, l.bin, l.gl, l.hl, l.gain = f, k, gl, hl, gain
			}
		}
	}
}
