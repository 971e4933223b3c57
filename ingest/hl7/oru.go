package hl7

import (
	"fmt"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/ingest/binding"
	"github.com/vigilhealth/vigil/ingest/mapping"
	"github.com/vigilhealth/vigil/ingest/validate"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// ContentType is the content type of raw HL7 v2 bytes on dead letters.
const ContentType = "x-application/hl7-v2+er7"

// Resolver finds the patient bound to a device or bed at a time
// (ingest/binding's Store). It must be safe for concurrent use and must not
// block on I/O.
type Resolver interface {
	Resolve(tenant, deviceOrBed string, atMs int64) (patient string, ok bool)
}

// Decoder turns ORU^R01 messages (IHE PCD-01) into canonical samples. It is
// immutable and safe for concurrent use.
type Decoder struct {
	// Codes maps OBX-3 and OBX-6 codes; required.
	Codes Codes
	// Validator checks and normalises each sample; required.
	Validator *validate.Validator
	// Zone is the time zone of HL7 times without a UTC offset (UTC when
	// nil).
	Zone *time.Location
	// Waveforms makes NA observations (sampled waveforms) into
	// waveform chunks (see Waveform); without it they are refused as
	// unsupported_value.
	Waveforms bool
}

// Env is what a message is decoded in.
type Env struct {
	// Tenant the message belongs to (from the sending facility).
	Tenant string
	// NowMs is the ingest time, Unix epoch ms.
	NowMs int64
	// Resolver resolves the patient when PID-3 is absent; may be nil.
	Resolver Resolver
	// Origin is where the message came from (remote address).
	Origin string
}

// Result is what one ORU message became.
type Result struct {
	// Batches hold the accepted samples, one batch per (patient, device).
	Batches []*vigilv1.SampleBatch
	// Letters are the refusals: one per refused OBX, one per batch whose
	// patient could not be resolved (reason unbound_device, carrying the
	// batch for a later re-drive).
	Letters []*vigilv1.DeadLetter
	// Waveforms are the NA observations made into waveform chunks (only
	// with Decoder.Waveforms), for the waveform Sink.
	Waveforms []Waveform
	// Issues locate every refusal for the ACK's ERR segments.
	Issues []Issue
	// Samples counts the accepted samples (including unbound ones, which
	// Vigil keeps as dead letters for re-drive).
	Samples int
}

// absentStatus are OBX-11 result statuses (HL7 table 0085) under which
// OBX-5 holds no usable value: D deleted, W wrong (posted to the wrong
// patient), X cannot be obtained, N not asked, I pending, O order detail.
var absentStatus = map[string]string{
	"D": "deleted", "W": "posted in error", "X": "could not be obtained", "N": "not asked",
	"I": "pending (specimen in lab)", "O": "order detail only, no result",
}

// sentinels are values devices send for "no measurement".
var sentinels = map[float64]bool{-999: true, -9999: true, -99999: true, 99999: true, 999999: true, -1e9: true}

// MaxWaveformValues bounds the values of one NA observation.
const MaxWaveformValues = 1 << 16

type batchKey struct{ patient, device string }

// oruState is the state of decoding one message.
type oruState struct {
	d       *Decoder
	env     Env
	m       *Message
	h       Header
	res     *Result
	patient string
	loc     string
	mshTime int64
	mshOK   bool
	obrTime int64
	obrOK   bool
	obrSeq  int
	// mdsDevice is the device id (OBX-18) given on a containment OBX,
	// keyed by the first part of its OBX-4 (the MDS number of PCD-01's
	// MDS.VMD.CHAN.METRIC sub-id).
	mdsDevice map[string]string
	// rates are the sample rates (Hz) given by MDC_ATTR_SAMP_RATE /
	// MDC_ATTR_TIME_PD_SAMP observations, by the OBX-4 they apply to.
	rates map[string]float64
	// anyRate is the message's only sample rate (0 when none or several
	// different ones).
	anyRate float64
	batches map[batchKey]*vigilv1.SampleBatch
	order   []batchKey
}

// DecodeORU decodes an ORU^R01 message: every OBX of type NM or numeric SN
// becomes a sample (validated), every other OBX a refusal with its reason;
// containment OBX (PCD-01's MDS/VMD/channel rows without a value) only
// name the device. It does no I/O.
func (d *Decoder) DecodeORU(m *Message, env Env) *Result {
	s := &oruState{d: d, env: env, m: m, h: ReadHeader(m), res: &Result{}, mdsDevice: map[string]string{},
		batches: map[batchKey]*vigilv1.SampleBatch{}}
	if d.Waveforms {
		s.collectRates()
	}
	if t, err := ParseTime(s.h.TimeRaw, d.Zone); err == nil {
		s.mshTime, s.mshOK = t, true
	}
	if pid, ok := m.First("PID"); ok {
		s.patient = PatientID(pid.Field(3))
	}
	if pv1, ok := m.First("PV1"); ok {
		s.loc = LocationKey(pv1.Field(3))
	}
	for i := 0; i < m.Len(); i++ {
		seg := m.Segment(i)
		switch {
		case seg.Is("OBR"):
			s.obrSeq = seg.Occurrence()
			s.obrOK = false
			if f := seg.Field(7); !f.Empty() {
				if t, err := ParseTime(f.Raw(), d.Zone); err == nil {
					s.obrTime, s.obrOK = t, true
				}
			}
		case seg.Is("OBX"):
			s.obx(seg)
		}
	}
	s.finish()
	return s.res
}

// PatientID picks the patient id from PID-3 (CX, repeating): the
// repetition whose identifier type (CX-5) is MR, else the first one with an
// id.
func PatientID(f Field) string {
	first := ""
	for r := 0; r < f.Reps() && r < 32; r++ {
		rep := f.Rep(r)
		id := rep.Component(1).String()
		if id == "" {
			continue
		}
		if strings.EqualFold(rep.Component(5).String(), "MR") {
			return id
		}
		if first == "" {
			first = id
		}
	}
	return first
}

// LocationKey is the binding.BedKey of a PL field (PV1-3, PV1-6): ADT binds
// it to the patient, and an ORU without a patient id resolves its samples
// through it. "" when empty.
func LocationKey(f Field) string {
	return binding.BedKey(f.Component(1).Sub(1).String(), f.Component(2).Sub(1).String(), f.Component(3).Sub(1).String())
}

func (s *oruState) obx(seg Segment) {
	n := seg.Occurrence()
	vt := strings.ToUpper(seg.Field(2).Component(1).String())
	val := seg.Field(5)
	subID := seg.Field(4).String()
	mds, _, _ := strings.Cut(subID, ".")
	dev := seg.Field(18).Component(1).String()
	if dev != "" && s.mdsDevice[mds] == "" {
		s.mdsDevice[mds] = dev
	}
	if vt == "" && val.Empty() {
		return // a containment row (MDS, VMD, channel): names the device only
	}
	code := seg.Field(3)
	if isRateAttr(code) {
		return // read by collectRates: describes a waveform, no sample
	}
	if dev == "" {
		dev = s.mdsDevice[mds]
	}
	if dev == "" {
		dev = s.h.SendingFacility
	}
	if dev == "" {
		dev = s.h.SendingApp
	}
	refuse := func(field int, reason validate.Reason, code string, format string, args ...any) {
		s.refuseOBX(seg, n, field, reason, code, dev, fmt.Sprintf(format, args...))
	}
	if st := strings.ToUpper(seg.Field(11).String()); absentStatus[st] != "" {
		refuse(11, validate.AbsentValue, CodeTableValue, "result status %q (%s): no value", st, absentStatus[st])
		return
	}
	switch vt {
	case "NM", "SN":
	case "NA", "MA":
		if !s.d.Waveforms {
			refuse(2, validate.UnsupportedValue, CodeDataType, "value type %s (waveform) is not taken: no waveform processing is configured", vt)
			return
		}
	default:
		if vt == "" {
			refuse(2, validate.UnsupportedValue, CodeRequiredMissing, "no value type (OBX-2) for a value")
		} else {
			refuse(2, validate.UnsupportedValue, CodeDataType, "value type %s is not numeric: Vigil takes NM and numeric SN", clipText(vt, 8))
		}
		return
	}
	if vt == "NA" || vt == "MA" {
		s.waveformOBX(seg, n, dev, subID)
		return
	}
	metric, srcCode, iss := s.mapCode(code)
	if iss != nil {
		s.refuseOBX(seg, n, 3, iss.Reason, iss.Code, dev, iss.Message)
		return
	}
	t, tField, ok := s.eventTime(seg)
	if !ok {
		return // refused inside
	}
	unit, uiss := s.mapUnit(seg.Field(6))
	if uiss != nil {
		s.refuseOBX(seg, n, 6, uiss.Reason, uiss.Code, dev, uiss.Message)
		return
	}
	if val.Empty() {
		refuse(5, validate.AbsentValue, CodeRequiredMissing, "no value")
		return
	}
	if val.Reps() > 1 {
		refuse(5, validate.UnsupportedValue, CodeDataType, "%d repeated values in one observation", val.Reps())
		return
	}
	var v float64
	if vt == "NM" {
		if v, ok = ParseNumber(val.Raw()); !ok {
			refuse(5, validate.InvalidType, CodeDataType, "value %q is not a number (type NM)", clipText(val.String(), 32))
			return
		}
	} else if v, ok = structuredNumber(val); !ok {
		refuse(5, validate.UnsupportedValue, CodeDataType, "structured numeric %q is not a plain number (comparator, range or ratio)", clipText(string(val.Raw()), 32))
		return
	}
	if sentinels[v] {
		refuse(5, validate.AbsentValue, CodeDataType, "value %g is a device sentinel for no measurement", v)
		return
	}
	patient := s.patient
	bound := patient != ""
	if !bound && s.env.Resolver != nil {
		if p, ok := s.env.Resolver.Resolve(s.env.Tenant, dev, t); ok {
			patient, bound = p, true
		} else if s.loc != "" {
			if p, ok := s.env.Resolver.Resolve(s.env.Tenant, s.loc, t); ok {
				patient, bound = p, true
			}
		}
	}
	in := validate.Input{Tenant: s.env.Tenant, Patient: patient, Device: dev, Metric: metric, SourceCode: srcCode,
		Value: v, HasValue: true, Unit: unit, EventTimeMs: t, HasTime: true, Channel: subID}
	if !bound {
		in.Patient = "unbound" // validated as a placeholder, cleared below
	}
	out := new(vigilv1.Sample)
	if r := s.d.Validator.Sample(&in, s.env.NowMs, out); r != nil {
		field, code := 5, CodeDataType
		switch r.Field {
		case validate.FieldUnit:
			field = 6
		case validate.FieldTime:
			if tField != 14 {
				s.refuseAt(Issue{Segment: tSegment(tField), Sequence: s.timeSeq(tField), Field: 7,
					Code: code, Severity: SeverityError, Reason: r.Reason, Message: r.Message}, seg.Raw(), dev)
				return
			}
			field = 14
		case validate.FieldChannel:
			field = 4
		case validate.FieldDevice:
			field = 18
		case validate.FieldMetric, validate.FieldLOINC:
			field = 3
		case validate.FieldPatient:
			s.refuseAt(Issue{Segment: "PID", Sequence: 1, Field: 3, Code: CodeDataType, Severity: SeverityError,
				Reason: r.Reason, Message: r.Message}, seg.Raw(), dev)
			return
		case validate.FieldTenant:
			s.refuseAt(Issue{Segment: "MSH", Sequence: 1, Field: 4, Code: CodeTableValue, Severity: SeverityError,
				Reason: r.Reason, Message: r.Message}, seg.Raw(), dev)
			return
		}
		s.refuseOBX(seg, n, field, r.Reason, code, dev, r.Message)
		return
	}
	if !bound {
		patient = ""
	}
	s.add(patient, dev, out)
}

// Time fields other than OBX-14 are encoded as negative markers.
const (
	timeOBR7 = -7
	timeMSH7 = -70
)

func tSegment(f int) string {
	if f == timeOBR7 {
		return "OBR"
	}
	return "MSH"
}

func (s *oruState) timeSeq(f int) int {
	if f == timeOBR7 {
		return s.obrSeq
	}
	return 1
}

// eventTime takes OBX-14, else OBR-7, else MSH-7; it refuses the OBX when
// there is none.
func (s *oruState) eventTime(seg Segment) (int64, int, bool) {
	t, field, err := s.obsTime(seg)
	switch {
	case err != nil:
		s.refuseOBX(seg, seg.Occurrence(), 14, validate.InvalidTime, CodeDataType, s.h.SendingFacility, err.Error())
		return 0, 14, false
	case field == 0:
		s.refuseOBX(seg, seg.Occurrence(), 14, validate.InvalidTime, CodeRequiredMissing, s.h.SendingFacility,
			"no valid observation time: OBX-14, OBR-7 and MSH-7 are empty or invalid")
		return 0, 14, false
	}
	return t, field, true
}

// obsTime is the time of an OBX: OBX-14 (field 14, or an error when it is
// invalid), else OBR-7 (timeOBR7), else MSH-7 (timeMSH7), else none
// (field 0).
func (s *oruState) obsTime(seg Segment) (int64, int, error) {
	if f := seg.Field(14); !f.Empty() {
		t, err := ParseTime(f.Raw(), s.d.Zone)
		if err != nil {
			return 0, 14, err
		}
		return t, 14, nil
	}
	if s.obrOK {
		return s.obrTime, timeOBR7, nil
	}
	if s.mshOK {
		return s.mshTime, timeMSH7, nil
	}
	return 0, 0, nil
}

// structuredNumber reads an SN (comparator ^ num1 ^ separator ^ num2) that is
// a plain number: no comparator other than "=", no separator.
func structuredNumber(f Field) (float64, bool) {
	cmp := f.Component(1).String()
	if cmp != "" && cmp != "=" {
		return 0, false
	}
	if !f.Component(3).Empty() || !f.Component(4).Empty() {
		return 0, false
	}
	return ParseNumber(f.Component(2).Raw())
}

// codeSystem normalises a coding system name to mapping's "MDC", "LOINC"
// or "UCUM" (also "LNC" and "ISO+", which some senders use); any other
// system is returned as given.
func codeSystem(s string) string {
	if c, ok := mapping.CanonicalSystem(s); ok {
		return c
	}
	switch strings.ToUpper(strings.TrimSpace(s)) {
	case "LNC":
		return mapping.SystemLOINC
	case "ISO+":
		return mapping.SystemUCUM
	}
	return strings.TrimSpace(s)
}

// mapCode maps OBX-3 (CWE: code ^ text ^ system ^ alt code ^ alt text ^ alt
// system) onto a metric: the primary coding, else the alternate one.
func (s *oruState) mapCode(f Field) (metric, srcCode string, iss *Issue) {
	type coding struct{ code, text, system string }
	cs := [2]coding{
		{f.Component(1).String(), f.Component(2).String(), codeSystem(f.Component(3).String())},
		{f.Component(4).String(), f.Component(5).String(), codeSystem(f.Component(6).String())},
	}
	loinc := false
	for _, c := range cs {
		if c.code == "" && c.text == "" {
			continue
		}
		sys := c.system
		if sys == "" && (strings.HasPrefix(c.text, "MDC_") || strings.HasPrefix(c.code, "MDC_")) {
			sys = "MDC"
		}
		switch sys {
		case "MDC":
			if m, ok := s.d.Codes.Metric("MDC", c.code); ok && c.code != "" {
				return m, "MDC:" + c.code, nil
			}
			if strings.HasPrefix(c.text, "MDC_") {
				if m, ok := s.d.Codes.Metric("MDC", c.text); ok {
					if c.code == "" {
						return m, "MDC:" + c.text, nil
					}
					return m, "MDC:" + c.code, nil
				}
			}
		case mapping.SystemLOINC:
			loinc = true
			if m, ok := s.d.Codes.Metric(mapping.SystemLOINC, c.code); ok {
				return m, "LOINC:" + c.code, nil
			}
		case "":
		default:
			// A local coding system: only a hospital's own table knows it.
			if m, ok := s.d.Codes.Metric(sys, c.code); ok && c.code != "" {
				return m, sys + ":" + c.code, nil
			}
		}
	}
	primary := cs[0]
	if primary.code == "" {
		return "", "", &Issue{Code: CodeRequiredMissing, Reason: validate.MissingField, Message: "no observation identifier"}
	}
	if u, ok := s.d.Codes.(UnmappedCounter); ok {
		u.Unmapped(vigilv1.Source_SOURCE_MLLP, primary.system, primary.code)
	}
	if loinc {
		return "", "", &Issue{Code: CodeTableValue, Reason: validate.NotVitalSign,
			Message: fmt.Sprintf("LOINC %s (%s) is not a vital sign in Vigil's catalogue", clipText(primary.code, 32), clipText(primary.text, 64))}
	}
	return "", "", &Issue{Code: CodeTableValue, Reason: validate.UnmappedCode,
		Message: fmt.Sprintf("observation code %s (%s, system %q) has no entry in the mapping tables", clipText(primary.code, 32), clipText(primary.text, 64), clipText(primary.system, 32))}
}

// mapUnit maps OBX-6 (CWE) onto a UCUM unit; "" when empty (the canonical
// unit). A unit that is neither an MDC code nor in the UCUM table is passed
// on as it is, for validation to judge.
func (s *oruState) mapUnit(f Field) (string, *Issue) {
	code, text, sys := f.Component(1).String(), f.Component(2).String(), codeSystem(f.Component(3).String())
	if code == "" && text == "" {
		return "", nil
	}
	if sys == "MDC" || (sys == "" && (strings.HasPrefix(code, "MDC_") || strings.HasPrefix(text, "MDC_"))) {
		if u, ok := s.d.Codes.Unit("MDC", code); ok && code != "" {
			return u, nil
		}
		if u, ok := s.d.Codes.Unit("MDC", text); ok && text != "" {
			return u, nil
		}
		if c, ok := s.d.Codes.(UnmappedCounter); ok {
			c.Unmapped(vigilv1.Source_SOURCE_MLLP, "MDC", code)
		}
		return "", &Issue{Code: CodeTableValue, Reason: validate.UnmappedCode,
			Message: fmt.Sprintf("unit code %s (%s, system MDC) has no entry in the mapping tables", clipText(code, 32), clipText(text, 64))}
	}
	if code == "" {
		code = text
	}
	if u, ok := s.d.Codes.Unit("UCUM", code); ok {
		return u, nil
	}
	return code, nil
}

func (s *oruState) refuseOBX(seg Segment, n, field int, reason validate.Reason, code, dev, msg string) {
	s.refuseAt(Issue{Segment: "OBX", Sequence: n, Field: field, Code: code, Severity: SeverityError, Reason: reason, Message: msg}, seg.Raw(), dev)
}

func (s *oruState) refuseAt(is Issue, raw []byte, dev string) {
	s.res.Issues = append(s.res.Issues, is)
	s.res.Letters = append(s.res.Letters, &vigilv1.DeadLetter{
		Reason: string(is.Reason), Message: is.Message, Source: vigilv1.Source_SOURCE_MLLP, Origin: s.env.Origin,
		Field: is.Path(), Raw: append([]byte(nil), raw...), Tenant: s.env.Tenant, Patient: s.patient, Device: dev,
		MessageId: s.h.ControlID, ContentType: ContentType,
	})
}

func (s *oruState) add(patient, dev string, smp *vigilv1.Sample) {
	k := batchKey{patient, dev}
	b := s.batches[k]
	if b == nil {
		b = &vigilv1.SampleBatch{Tenant: s.env.Tenant, Patient: patient, Device: dev, Source: vigilv1.Source_SOURCE_MLLP,
			IngestTimeMs: s.env.NowMs, MessageId: s.h.ControlID, Location: s.loc}
		s.batches[k] = b
		s.order = append(s.order, k)
	}
	b.Samples = append(b.Samples, smp)
	s.res.Samples++
}

func (s *oruState) finish() {
	for _, k := range s.order {
		b := s.batches[k]
		if k.patient != "" {
			s.res.Batches = append(s.res.Batches, b)
			continue
		}
		msg := fmt.Sprintf("no patient: PID-3 is empty and no patient is bound to device %q", k.device)
		if s.loc != "" {
			msg += fmt.Sprintf(" or bed %q", s.loc)
		}
		msg += "; re-drive once a binding exists"
		is := Issue{Segment: "PID", Sequence: 1, Field: 3, Code: CodeUnknownKey, Severity: SeverityWarning,
			Reason: validate.UnboundDevice, Message: msg}
		s.res.Issues = append(s.res.Issues, is)
		s.res.Letters = append(s.res.Letters, &vigilv1.DeadLetter{
			Reason: string(validate.UnboundDevice), Message: msg, Source: vigilv1.Source_SOURCE_MLLP, Origin: s.env.Origin,
			Field: is.Path(), Raw: s.m.Raw(), Tenant: s.env.Tenant, Device: k.device, MessageId: s.h.ControlID,
			ContentType: ContentType, Batch: b,
		})
	}
}
