package hl7

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/ingest/waveform"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Waveforms (IHE PCD-01 waveform content module): an OBX of value type NA
// (or MA) carries equally spaced samples of one channel as components
// ("0.12^0.15^0.11"). Its sample rate is given by a companion observation,
// as PCD-01 gateways send it:
//
//	OBX|5|NA|131330^MDC_ECG_ELEC_POTL_II^MDC|1.1.1.131330|0.12^0.15^...|266418^MDC_DIM_MILLI_VOLT^MDC|||||F|||20240301101455.000+0000
//	OBX|6|NM|0^MDC_ATTR_SAMP_RATE^MDC|1.1.1.131330.1|500|264608^MDC_DIM_PER_SEC^MDC|||||F
//
// The rate is an OBX whose OBX-3 names MDC_ATTR_SAMP_RATE (samples per
// second: units MDC_DIM_PER_SEC, MDC_DIM_HZ, "Hz", "/s" or none) or
// MDC_ATTR_TIME_PD_SAMP (code 67981, the sample period: units
// MDC_DIM_SEC/"s" (the default), MDC_DIM_MILLI_SEC/"ms",
// MDC_DIM_MICRO_SEC/"us"), before or after the waveform. It applies to the
// waveform whose OBX-4 is its own OBX-4 less the last part (PCD-01's
// "1.1.1.131330.1" describes "1.1.1.131330"), else to the one with the
// same OBX-4; when the message has one rate only, it applies to every
// waveform of the message. A waveform without a rate is refused
// (unsupported_value on OBX-5).
//
// The waveform's kind: ECG leads are the MDC codes of partition 2 from
// MDC_ECG_ELEC_POTL (131328) to 131583 (lead I 131329, II 131330, III
// 131389, aVR/aVL/aVF 131390-131392, V1-V6 131331-131336), or a reference
// id starting MDC_ECG_ELEC_POTL or MDC_ECG_LEAD; they become metric "ecg".
// Any other code goes through the mapping tables like a numeric. The unit
// is MDC_DIM_MILLI_VOLT (266418) → mV, MDC_DIM_MICRO_VOLT (266419) → uV,
// MDC_DIM_VOLT (266400) → V, else as for numerics. The event time (OBX-14,
// OBR-7, MSH-7) is the time of the first value; OBX-4 is the channel.

// Waveform is one NA observation made into a waveform chunk.
type Waveform struct {
	Chunk *waveform.Chunk
	// Sequence is the OBX occurrence it came from (for ERR and dead
	// letters when the Sink refuses it).
	Sequence int
	// Raw is the OBX segment (a slice of the message's bytes).
	Raw []byte
}

// rateAttr tells a sample-rate observation: 1 for a rate (Hz), 2 for a
// period, 0 for neither.
func rateAttr(code Field) int {
	c1, c2 := code.Component(1).String(), code.Component(2).String()
	switch {
	case strings.Contains(c2, "MDC_ATTR_SAMP_RATE") || c1 == "MDC_ATTR_SAMP_RATE":
		return 1
	case strings.Contains(c2, "MDC_ATTR_TIME_PD_SAMP") || c1 == "MDC_ATTR_TIME_PD_SAMP" || c1 == "67981":
		return 2
	}
	return 0
}

func isRateAttr(code Field) bool { return rateAttr(code) != 0 }

// rateHz reads a rate observation's value in Hz.
func rateHz(seg Segment) (float64, bool) {
	kind := rateAttr(seg.Field(3))
	v, ok := ParseNumber(seg.Field(5).Raw())
	if !ok || v <= 0 {
		return 0, false
	}
	u := seg.Field(6)
	unit := strings.ToUpper(u.Component(1).String() + " " + u.Component(2).String())
	if kind == 1 {
		return v, true
	}
	switch {
	case strings.Contains(unit, "MILLI_SEC") || strings.Contains(unit, "264338") || strings.HasPrefix(unit, "MS "):
		v /= 1e3
	case strings.Contains(unit, "MICRO_SEC") || strings.Contains(unit, "264339") || strings.HasPrefix(unit, "US "):
		v /= 1e6
	}
	return 1 / v, true
}

// collectRates reads every sample-rate observation of the message.
func (s *oruState) collectRates() {
	s.rates = map[string]float64{}
	distinct := 0
	for i := 0; i < s.m.Len(); i++ {
		seg := s.m.Segment(i)
		if !seg.Is("OBX") || !isRateAttr(seg.Field(3)) {
			continue
		}
		hz, ok := rateHz(seg)
		if !ok {
			continue
		}
		if distinct == 0 || hz != s.anyRate {
			distinct++
			s.anyRate = hz
		}
		sub := seg.Field(4).String()
		if _, taken := s.rates[sub]; !taken {
			s.rates[sub] = hz
		}
		if i := strings.LastIndexByte(sub, '.'); i > 0 {
			s.rates[sub[:i]] = hz // the parent's rate: more specific, wins
		}
	}
	if distinct != 1 {
		s.anyRate = 0
	}
}

// ecgLead reports whether an OBX-3 names an ECG lead potential.
func ecgLead(code Field) bool {
	c1, c2 := code.Component(1).String(), code.Component(2).String()
	for _, ref := range []string{c1, c2} {
		if strings.HasPrefix(ref, "MDC_ECG_ELEC_POTL") || strings.HasPrefix(ref, "MDC_ECG_LEAD") {
			return true
		}
	}
	if sys := codeSystem(code.Component(3).String()); sys != "MDC" && sys != "" {
		return false
	}
	n, err := strconv.Atoi(c1)
	return err == nil && n >= 131328 && n <= 131583
}

// waveUnit maps the MDC voltage units of waveforms onto UCUM.
func waveUnit(f Field) (string, bool) {
	c1, c2 := f.Component(1).String(), f.Component(2).String()
	switch {
	case c1 == "266418" || c2 == "MDC_DIM_MILLI_VOLT" || c1 == "MDC_DIM_MILLI_VOLT":
		return "mV", true
	case c1 == "266419" || c2 == "MDC_DIM_MICRO_VOLT" || c1 == "MDC_DIM_MICRO_VOLT":
		return "uV", true
	case c1 == "266400" || c2 == "MDC_DIM_VOLT" || c1 == "MDC_DIM_VOLT":
		return "V", true
	}
	return "", false
}

// resolve finds the patient of a device (or of the message's bed) at t.
func (s *oruState) resolve(dev string, t int64) (string, bool) {
	if s.patient != "" {
		return s.patient, true
	}
	if s.env.Resolver == nil {
		return "", false
	}
	if p, ok := s.env.Resolver.Resolve(s.env.Tenant, dev, t); ok {
		return p, true
	}
	if s.loc != "" {
		return s.env.Resolver.Resolve(s.env.Tenant, s.loc, t)
	}
	return "", false
}

func (s *oruState) waveformOBX(seg Segment, n int, dev, channel string) {
	code := seg.Field(3)
	metric := ""
	if ecgLead(code) {
		metric = "ecg"
	} else {
		m, _, iss := s.mapCode(code)
		if iss != nil {
			s.refuseOBX(seg, n, 3, iss.Reason, iss.Code, dev, iss.Message)
			return
		}
		metric = m
	}
	unit, ok := waveUnit(seg.Field(6))
	if !ok {
		u, iss := s.mapUnit(seg.Field(6))
		if iss != nil {
			s.refuseOBX(seg, n, 6, iss.Reason, iss.Code, dev, iss.Message)
			return
		}
		unit = u
	}
	t, _, ok := s.eventTime(seg)
	if !ok {
		return // refused inside
	}
	hz := s.rates[channel]
	if hz == 0 {
		hz = s.anyRate
	}
	if hz <= 0 {
		s.refuseOBX(seg, n, 5, validate.UnsupportedValue, CodeRequiredMissing, dev,
			"waveform without a sample rate: send an MDC_ATTR_SAMP_RATE observation under its OBX-4 (e.g. "+clipText(channel, 32)+".1)")
		return
	}
	val := seg.Field(5)
	if val.Empty() {
		s.refuseOBX(seg, n, 5, validate.AbsentValue, CodeRequiredMissing, dev, "waveform without values")
		return
	}
	raw := val.Rep(0).Raw()
	vals := make([]float64, 0, min(len(raw)/2+1, MaxWaveformValues))
	comp := s.m.Delims.Component
	for len(raw) > 0 {
		if len(vals) == MaxWaveformValues {
			s.refuseOBX(seg, n, 5, validate.TooManySamples, CodeDataType, dev, fmt.Sprintf("waveform has more than %d values", MaxWaveformValues))
			return
		}
		part := raw
		if i := indexByte(raw, comp); i >= 0 {
			part, raw = raw[:i], raw[i+1:]
		} else {
			raw = nil
		}
		v, ok := ParseNumber(part)
		if !ok {
			s.refuseOBX(seg, n, 5, validate.InvalidType, CodeDataType, dev, fmt.Sprintf("waveform value %q is not a number", clipBytes(part, 16)))
			return
		}
		vals = append(vals, v)
	}
	patient, bound := s.resolve(dev, t)
	if !bound {
		s.refuseAt(Issue{Segment: "PID", Sequence: 1, Field: 3, Code: CodeUnknownKey, Severity: SeverityError,
			Reason: validate.UnboundDevice, Message: fmt.Sprintf("waveform OBX[%d]: no patient (PID-3 empty, device %q not bound)", n, dev)}, seg.Raw(), dev)
		return
	}
	s.res.Waveforms = append(s.res.Waveforms, Waveform{Sequence: n, Raw: seg.Raw(), Chunk: &waveform.Chunk{
		Tenant: s.env.Tenant, Patient: patient, Device: dev, Channel: channel, Metric: metric, Unit: unit, RateHz: hz,
		StartMs: t, Values: vals, Source: vigilv1.Source_SOURCE_MLLP, MessageID: s.h.ControlID, Location: s.loc}})
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}
