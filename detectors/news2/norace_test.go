//go:build !race

package news2

// raceEnabled: the race detector's instrumentation allocates, so
// allocation counts are only checked without it.
const raceEnabled = false
