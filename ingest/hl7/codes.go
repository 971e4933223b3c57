package hl7

import (
	"github.com/vigilhealth/vigil/ingest/mapping"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Codes maps the codes a sender uses onto Vigil's catalogue: observation
// codes (OBX-3) onto metric ids, unit codes (OBX-6) onto UCUM. system is
// "MDC" (IEEE 11073-10101: the numeric code such as "150456" or the
// reference id such as "MDC_PULS_OXIM_SAT_O2"), "LOINC" or, for units,
// "UCUM". Implementations must be safe for concurrent use.
// ingest/mapping's Tables satisfy it (mapping.Default() is the default);
// StoreCodes adapts a hot-reloaded mapping.Store.
type Codes interface {
	Metric(system, code string) (metricID string, ok bool)
	Unit(system, code string) (ucum string, ok bool)
}

// UnmappedCounter is optionally implemented by a Codes (StoreCodes is) to
// count codes that had no entry, so that an integrator sees at once what is
// missing.
type UnmappedCounter interface {
	Unmapped(source vigilv1.Source, system, code string)
}

// StoreCodes returns Codes that look up the store's current tables (so a
// reload applies to the next message) and count unmapped codes on it.
func StoreCodes(s *mapping.Store) Codes { return storeCodes{s} }

type storeCodes struct{ s *mapping.Store }

func (c storeCodes) Metric(system, code string) (string, bool) {
	return c.s.Tables().Metric(system, code)
}
func (c storeCodes) Unit(system, code string) (string, bool) { return c.s.Tables().Unit(system, code) }
func (c storeCodes) Unmapped(source vigilv1.Source, system, code string) {
	c.s.Unmapped(source, system, code)
}
