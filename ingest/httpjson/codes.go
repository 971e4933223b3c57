package httpjson

import (
	"github.com/vigilhealth/vigil/ingest/mapping"
	"github.com/vigilhealth/vigil/ingest/validate"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Codes gives the handler the mapping tables in force (ingest/mapping), to
// map a sample's LOINC code onto a metric and its unit (or a unit alias
// such as "bpm", "mmHg", "degF") onto UCUM, and counts the codes it could
// not map. *mapping.Store satisfies it (hot-reloaded tables; Unmapped
// counts vigil_ingest_unmapped_codes_total{source,system,code}).
// Implementations must be safe for concurrent use and must not block.
type Codes interface {
	// Tables returns the immutable tables in force.
	Tables() *mapping.Tables
	// Unmapped counts a code that had no entry.
	Unmapped(source vigilv1.Source, system, code string)
}

// SetCodes makes the handler map LOINC codes and units through c: a LOINC
// code or a unit without an entry is then refused with reason
// unmapped_code (the code in the message and on the dead letter) and
// counted through c.Unmapped, and an edit of the mapping folder applies to
// the next request without a restart. Without it (nil, the default) the
// handler takes the LOINC codes and UCUM units of the metric catalogue
// only. Call it before the handler serves.
func (h *Handler) SetCodes(c Codes) { h.codes = c }

// mapCodes maps the LOINC code and unit of in through the tables t. It
// returns the unmapped_code refusal of sample i, after counting the code.
func (h *Handler) mapCodes(t *mapping.Tables, in *validate.Input, i int, s *sampleIn, source vigilv1.Source) *validate.Refusal {
	if in.LOINC != "" {
		id, ok := t.Metric(mapping.SystemLOINC, in.LOINC)
		if !ok {
			h.codes.Unmapped(source, mapping.SystemLOINC, in.LOINC)
			return validate.Refuse(validate.UnmappedCode, fieldPath(i, validate.FieldLOINC, s),
				"LOINC code %q has no entry in the mapping tables (add it to a file in ingest.mapping_dir)", clipStr(in.LOINC))
		}
		if in.Metric != "" && in.Metric != id {
			return validate.Refuse(validate.MetricMismatch, fieldPath(i, validate.FieldLOINC, s),
				"LOINC code %q is %s, not metric %q", in.LOINC, id, clipStr(in.Metric))
		}
		in.SourceCode = "LOINC:" + in.LOINC
		in.Metric, in.LOINC = id, ""
	}
	if in.Unit != "" {
		u, ok := t.Unit(mapping.SystemUCUM, in.Unit)
		if !ok {
			h.codes.Unmapped(source, mapping.SystemUCUM, in.Unit)
			return validate.Refuse(validate.UnmappedCode, fieldPath(i, validate.FieldUnit, s),
				"unit %q has no entry in the mapping tables (a UCUM unit, or an alias added in ingest.mapping_dir)", clipStr(in.Unit))
		}
		in.Unit = u
	}
	return nil
}

// clipStr bounds an echoed value so refusal messages stay short.
func clipStr(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
