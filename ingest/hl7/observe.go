package hl7

import "strings"

// Observation is what Vigil reads from one OBX before mapping it onto its
// catalogue: its coding as sent, its numeric value, its unit and its time,
// read by the same rules as DecodeORU (value types NM and numeric SN,
// OBX-6 through the unit tables, OBX-14 else OBR-7 else MSH-7).
type Observation struct {
	// Sequence is the OBX occurrence (1-based).
	Sequence int
	// Type is OBX-2 (upper case).
	Type string
	// Code, Text and System are OBX-3.1, .2 and .3 (System normalised:
	// "MDC", "LOINC", or as sent).
	Code, Text, System string
	// Value is the number of an NM or numeric SN observation (Numeric).
	Value   float64
	Numeric bool
	// Unit is OBX-6 as DecodeORU reads it (UCUM, MDC codes mapped).
	Unit string
	// TimeMs is the observation time, Unix ms (TimeOK false when none is
	// valid).
	TimeMs int64
	TimeOK bool
}

// ReadObservations reads every OBX of an ORU message (see Observation). It
// does no mapping onto metrics and no validation; it is for tools and
// tests that compare what Vigil reads with another reading of the same
// message.
func (d *Decoder) ReadObservations(m *Message) []Observation {
	s := &oruState{d: d, m: m, h: ReadHeader(m), res: &Result{}}
	if t, err := ParseTime(s.h.TimeRaw, d.Zone); err == nil {
		s.mshTime, s.mshOK = t, true
	}
	var out []Observation
	for i := 0; i < m.Len(); i++ {
		seg := m.Segment(i)
		switch {
		case seg.Is("OBR"):
			s.obrOK = false
			if f := seg.Field(7); !f.Empty() {
				if t, err := ParseTime(f.Raw(), d.Zone); err == nil {
					s.obrTime, s.obrOK = t, true
				}
			}
		case seg.Is("OBX"):
			code := seg.Field(3)
			o := Observation{Sequence: seg.Occurrence(), Type: strings.ToUpper(seg.Field(2).Component(1).String()),
				Code: code.Component(1).String(), Text: code.Component(2).String(), System: codeSystem(code.Component(3).String())}
			val := seg.Field(5)
			switch o.Type {
			case "NM":
				o.Value, o.Numeric = ParseNumber(val.Raw())
			case "SN":
				o.Value, o.Numeric = structuredNumber(val)
			}
			o.Unit, _ = s.mapUnit(seg.Field(6))
			if t, field, err := s.obsTime(seg); err == nil && field != 0 {
				o.TimeMs, o.TimeOK = t, true
			}
			out = append(out, o)
		}
	}
	return out
}
