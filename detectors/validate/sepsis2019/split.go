package sepsis2019

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"
)

// DefaultSeed is the seed of the default 70/30 split.
const DefaultSeed = 2019

// TrainFraction is the share of patients in the training part of Split.
const TrainFraction = 0.7

// Split divides patients by id into a training part (round(0.7 n)
// patients) and a held-out part (the rest), both sorted by id. The split
// depends only on the set of ids and the seed: the ids are sorted, shuffled
// with a PCG generator seeded (seed, seed) (math/rand/v2's PCG, whose
// output is fixed by its specification, so the split is the same on every
// Go version and machine), and the first round(0.7 n) go to training.
func Split(patients []*Patient, seed uint64) (train, test []*Patient) {
	ps := slices.Clone(patients)
	slices.SortFunc(ps, byID)
	r := rand.New(rand.NewPCG(seed, seed))
	r.Shuffle(len(ps), func(i, j int) { ps[i], ps[j] = ps[j], ps[i] })
	n := int(math.Round(TrainFraction * float64(len(ps))))
	train, test = ps[:n:n], ps[n:]
	slices.SortFunc(train, byID)
	slices.SortFunc(test, byID)
	return train, test
}

func byID(a, b *Patient) int { return cmp.Compare(a.ID, b.ID) }
