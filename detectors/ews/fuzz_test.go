package ews

import (
	"math"
	"testing"
	"time"
)

// FuzzParse feeds arbitrary documents to the table parser: it must not
// panic, and a table it accepts must score any input without panicking,
// band every present input of a single-scale unconditional parameter, and
// hash deterministically.
func FuzzParse(f *testing.F) {
	for _, k := range Kinds() {
		doc, _ := embeddedTable(k)
		f.Add(doc, 37.5)
	}
	f.Add([]byte(scale2Doc), 93.0)
	f.Add([]byte(siteMEWS), 120.0)
	f.Add([]byte("kind: x\nname: n\nversion: v\nparameters: []\n"), 0.0)
	f.Fuzz(func(t *testing.T, doc []byte, v float64) {
		r, err := Parse(doc)
		if err != nil {
			return
		}
		again, err := Parse(doc)
		if err != nil || again.Hash != r.Hash {
			t.Fatalf("re-parse: %v", err)
		}
		if math.IsNaN(v) || math.IsInf(v, 0) {
			v = 0
		}
		req := Request{Tenant: "t", Patient: "p", AtMs: at, Staleness: time.Hour,
			Latest: func(string) (Observation, bool) { return Observation{Value: v, TimeMs: at}, true }}
		req.Limits = r.Limits(func(string, string) time.Duration { return time.Hour })
		s := r.Score(req)
		if s == nil {
			t.Fatal("every input present but no score")
		}
		for i, p := range r.Parameters {
			c := s.Components[i]
			if len(p.Scales) == 1 && len(p.AnyAbove) == 0 && !hasWhen(p.Scales[0]) && (c.Missing || c.Stale) {
				t.Fatalf("parameter %s: present input not banded: %v", p.Name, c)
			}
		}
		d := r.Digest(s)
		if !r.UnchangedDigest(&d, req) {
			t.Fatal("a score's digest does not match its own request")
		}
	})
}

func hasWhen(s Scale) bool {
	for _, b := range s.Bands {
		if b.When != nil {
			return true
		}
	}
	return false
}

// FuzzRoundHalfAway: the fast path agrees with rounding the digits of
// the shortest decimal representation.
func FuzzRoundHalfAway(f *testing.F) {
	for _, v := range []float64{36.05, 36.1, 90.5, 97, 0.1, 1e-7, 2.675, -2.45, 1e300, 123456789.123, 0.30000000000000004} {
		f.Add(v, 1)
	}
	f.Fuzz(func(t *testing.T, v float64, d int) {
		if d < 0 || d > 6 || math.IsNaN(v) || math.IsInf(v, 0) {
			return
		}
		if got, want := RoundHalfAway(v, d), roundDecimal(v, d); got != want {
			t.Fatalf("RoundHalfAway(%v, %d) = %v, digit rounding gives %v", v, d, got, want)
		}
	})
}
