package mapping

import (
	"testing"

	"github.com/vigilhealth/vigil/internal/catalog"
)

// FuzzParse feeds arbitrary bytes to the mapping-file parser (a hospital's
// files are outside bytes): no panic, and a file that loads gives tables
// whose lookups do not panic either.
func FuzzParse(f *testing.F) {
	f.Add(defaultYAML)
	f.Add([]byte("version: 1\nmetrics:\n  - {system: MDC, code: \"150388\", ref: MDC_TEMP_SKIN, metric: body_temperature}\nunits:\n  - {system: UCUM, code: b/min, ucum: /min}\n"))
	f.Add([]byte("version: 1\nmetrics:\n  - {system: LN, code: 8328-7, metric: body_temperature}\n"))
	f.Add([]byte("version: 1\nmetrics: [\n"))
	f.Add([]byte("version: 1\nunits:\n  - {system: MDC, ref: MDC_DIM_PERCENT, ucum: \"%\"}\n"))
	f.Add([]byte("&a [*a, *a]"))
	cat := catalog.Default()
	f.Fuzz(func(t *testing.T, doc []byte) {
		if len(doc) > MaxFileBytes {
			return
		}
		// The file alone (without the defaults) keeps each run short.
		tb, err := build(cat, []source{{"fuzz.yaml", doc}})
		if err != nil {
			return
		}
		for _, sys := range []string{"MDC", "LN", "UCUM", ""} {
			tb.Metric(sys, string(doc))
			tb.Unit(sys, string(doc))
			tb.Metric(sys, "150456")
		}
	})
}

// FuzzLookup: lookups take codes straight from messages.
func FuzzLookup(f *testing.F) {
	for _, s := range []string{"150456", "MDC_PULS_OXIM_SAT_O2", "2::19384", "8867-4", "bpm", "mm[Hg]", "°F", "65535::65535", "99999999999"} {
		f.Add("MDC", s)
		f.Add("UCUM", s)
	}
	tb := Default()
	f.Fuzz(func(t *testing.T, system, code string) {
		if id, ok := tb.Metric(system, code); ok && id == "" {
			t.Fatalf("Metric(%q, %q) ok with empty id", system, code)
		}
		if u, ok := tb.Unit(system, code); ok && u == "" {
			t.Fatalf("Unit(%q, %q) ok with empty unit", system, code)
		}
	})
}
