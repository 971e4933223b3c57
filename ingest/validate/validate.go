// Package validate is the shared core of every ingest path (HTTP JSON, HL7 v2
// over MLLP, FHIR R4, MQTT): it turns one decoded sample into a canonical
// vigilv1.Sample, or into a structured Refusal that says, machine-readably
// and in a sentence, what was wrong and where.
//
// A decoder fills an Input from its wire format and calls Validator.Sample.
// The checks, in order:
//
//   - identifiers (tenant, patient, device, channel): present where required,
//     valid UTF-8, no control characters, no leading or trailing spaces,
//     bounded length; the tenant may not contain '/' (it is the first part of
//     the Kafka key "<tenant>/<patient>");
//   - metric: a catalogue id or a LOINC code the catalogue knows (when both
//     are given they must name the same metric);
//   - value: present and finite;
//   - unit: convertible to the metric's canonical UCUM unit (an empty unit is
//     read as the canonical unit); a converted value is flagged
//     QUALITY_CONVERTED;
//   - range: the canonical value lies in the metric's physiological range;
//   - event time: present, not before the Unix epoch, not further than
//     MaxFutureSkew ahead of now, not older than MaxAge (when set); older
//     than BackfillAge is kept and flagged QUALITY_BACKFILL.
//
// Validation is pure: no I/O, no clock (the caller passes now). A Validator is
// immutable and safe for concurrent use.
package validate

import (
	"fmt"
	"math"
	"time"
	"unicode/utf8"

	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/config"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Reason is a machine-readable refusal reason: snake_case, from the closed
// list below. Reasons travel in DeadLetter.reason and in HTTP problem bodies;
// adding one is a contract change (add it to Reasons too).
type Reason string

// The closed list of refusal reasons of the ingest paths.
const (
	// A required field is absent (or empty).
	MissingField Reason = "missing_field"
	// An identifier (tenant, patient, device, channel, message id) is not
	// acceptable: control characters, invalid UTF-8, too long, '/' in a
	// tenant, surrounding spaces.
	InvalidID Reason = "invalid_id"
	// The metric id or LOINC code is not in the catalogue.
	UnknownMetric Reason = "unknown_metric"
	// A metric id and a LOINC code were both given and name different
	// metrics.
	MetricMismatch Reason = "metric_mismatch"
	// The unit cannot be converted to the metric's canonical unit.
	UnitNotConvertible Reason = "unit_not_convertible"
	// The value is NaN or infinite (or overflows float64).
	NotFinite Reason = "not_finite"
	// The canonical value is outside the metric's physiological range.
	OutOfRange Reason = "out_of_range"
	// The event time is unparseable or before the Unix epoch.
	InvalidTime Reason = "invalid_time"
	// The event time is further ahead of ingest time than MaxFutureSkew.
	FutureTime Reason = "future_time"
	// The event time is older than MaxAge.
	TooOld Reason = "too_old"
	// The input is not syntactically valid for its format (JSON, HL7...).
	InvalidJSON Reason = "invalid_json"
	// A field is not part of the schema.
	UnknownField Reason = "unknown_field"
	// A field has the wrong type (e.g. a string where a number belongs).
	InvalidType Reason = "invalid_type"
	// The body exceeds the size bound.
	BodyTooLarge Reason = "body_too_large"
	// A message carries more samples than the bound.
	TooManySamples Reason = "too_many_samples"
	// The source's code (MDC or LOINC observation code, MDC or UCUM unit
	// code) has no entry in the mapping tables; the code is on the dead
	// letter so that an integrator can extend the tables.
	UnmappedCode Reason = "unmapped_code"
	// No patient is bound to the device or bed at the sample's event time
	// (ADT or the binding API); re-drivable once the binding exists.
	UnboundDevice Reason = "unbound_device"
	// The message is not valid for its format: MLLP framing, HL7 v2 syntax,
	// FHIR resource structure.
	MalformedMessage Reason = "malformed_message"
	// The message is well formed but of a kind Vigil does not take (an HL7
	// message type other than ORU/ADT, a FHIR resource other than an
	// Observation or Bundle).
	UnsupportedMessage Reason = "unsupported_message"
	// A valid FHIR Observation that is not a vital sign (laboratory,
	// survey, social history...).
	NotVitalSign Reason = "not_vital_sign"
	// The source marked the value absent or invalid: FHIR dataAbsentReason,
	// HL7 OBX-11 result status, or a sentinel such as -999.
	AbsentValue Reason = "absent_value"
	// The observation's value type is not numeric (HL7 OBX-2 other than NM
	// or numeric SN; FHIR value[x] other than Quantity).
	UnsupportedValue Reason = "unsupported_value"
	// The sender exceeded its rate limit; the message was not accepted and
	// should be sent again later (HTTP 429, MLLP slowed ACK).
	RateLimited Reason = "rate_limited"
)

// Reasons returns the closed list of reasons, for documentation and tests.
func Reasons() []Reason {
	return []Reason{MissingField, InvalidID, UnknownMetric, MetricMismatch, UnitNotConvertible, NotFinite,
		OutOfRange, InvalidTime, FutureTime, TooOld, InvalidJSON, UnknownField, InvalidType, BodyTooLarge,
		TooManySamples, UnmappedCode, UnboundDevice, MalformedMessage, UnsupportedMessage, NotVitalSign,
		AbsentValue, UnsupportedValue, RateLimited}
}

// Field names a sample field in Refusal.Field. The names are those of the HTTP
// JSON schema; other ingest paths map them onto their own paths (e.g. value →
// "OBX[2]-5").
const (
	FieldTenant  = "tenant"
	FieldPatient = "patient"
	FieldDevice  = "device"
	FieldMetric  = "metric"
	FieldLOINC   = "loinc"
	FieldValue   = "value"
	FieldUnit    = "unit"
	FieldTime    = "time"
	FieldSeq     = "seq"
	FieldChannel = "channel"
)

// Bounds on identifiers, in bytes.
const (
	MaxTenantLen  = 64
	MaxPatientLen = 128
	MaxDeviceLen  = 128
	MaxChannelLen = 64
)

// Refusal is why a sample (or a message) was not accepted. It is an error.
type Refusal struct {
	// Reason is machine-readable, from the closed list.
	Reason Reason
	// Field is the offending field (a Field* name, or a path set by the
	// decoder).
	Field string
	// Message is a sentence for a human, naming the value that was wrong.
	Message string
}

// Error returns "field: message (reason)".
func (r *Refusal) Error() string {
	if r.Field == "" {
		return fmt.Sprintf("%s (%s)", r.Message, r.Reason)
	}
	return fmt.Sprintf("%s: %s (%s)", r.Field, r.Message, r.Reason)
}

// Refuse builds a Refusal with a formatted message.
func Refuse(reason Reason, field, format string, args ...any) *Refusal {
	return &Refusal{Reason: reason, Field: field, Message: fmt.Sprintf(format, args...)}
}

// Input is one decoded sample as a wire format carried it. Decoders fill it;
// it holds no references after Sample returns.
type Input struct {
	Tenant, Patient, Device string
	// Metric is a catalogue id; LOINC a LOINC code. One of them is required;
	// when both are set they must agree.
	Metric string
	LOINC  string
	// SourceCode is the code the source used (e.g. "MDC:147842"), kept on
	// the sample; when empty and LOINC is set it becomes "LOINC:<code>".
	SourceCode string
	Value      float64
	// HasValue tells that a value was present.
	HasValue bool
	// Unit is a UCUM unit; empty means the canonical unit.
	Unit string
	// EventTimeMs is the measurement time, Unix epoch milliseconds UTC.
	EventTimeMs int64
	// HasTime tells that an event time was present.
	HasTime  bool
	Sequence uint64
	Channel  string
	// Quality carries the source's own QualityFlag bits (questionable,
	// artefact); validation adds CONVERTED and BACKFILL.
	Quality uint32
}

// Limits are the time bounds of validation (config.Ingest).
type Limits struct {
	// MaxFutureSkew refuses event times further than this ahead of now.
	MaxFutureSkew time.Duration
	// BackfillAge flags event times older than this as backfill (0 = never).
	BackfillAge time.Duration
	// MaxAge refuses event times older than this (0 = no limit).
	MaxAge time.Duration
}

// LimitsFrom takes the limits from the ingest configuration.
func LimitsFrom(c config.Ingest) Limits {
	return Limits{MaxFutureSkew: c.MaxFutureSkew, BackfillAge: c.BackfillAge, MaxAge: c.MaxAge}
}

// Validator validates samples against a catalogue and time limits. It is
// immutable and safe for concurrent use.
type Validator struct {
	cat *catalog.Catalog
	lim Limits
}

// New returns a Validator. cat must not be nil.
func New(cat *catalog.Catalog, lim Limits) *Validator {
	return &Validator{cat: cat, lim: lim}
}

// Catalog returns the catalogue the Validator checks against.
func (v *Validator) Catalog() *catalog.Catalog { return v.cat }

// Sample validates in at processing time nowMs (Unix epoch milliseconds) and,
// when it is acceptable, fills out (which the caller owns; every field of out
// is overwritten) and returns nil. Otherwise it returns the first Refusal
// found and leaves out in an unspecified state. It does not allocate on
// success.
func (v *Validator) Sample(in *Input, nowMs int64, out *vigilv1.Sample) *Refusal {
	if r := CheckIDs(in.Tenant, in.Patient, in.Device); r != nil {
		return r
	}
	if in.Channel != "" {
		if r := checkID(FieldChannel, in.Channel, MaxChannelLen, false); r != nil {
			return r
		}
	}
	m, r := v.metric(in)
	if r != nil {
		return r
	}
	if !in.HasValue {
		return Refuse(MissingField, FieldValue, "no value")
	}
	if math.IsNaN(in.Value) || math.IsInf(in.Value, 0) {
		return Refuse(NotFinite, FieldValue, "value %v is not a finite number", in.Value)
	}
	value, converted, err := m.Normalize(in.Value, in.Unit)
	if err != nil {
		return &Refusal{Reason: UnitNotConvertible, Field: FieldUnit, Message: err.Error()}
	}
	if math.IsNaN(value) || math.IsInf(value, 0) {
		return Refuse(NotFinite, FieldValue, "value %g %s is not finite in %s", in.Value, in.Unit, m.Unit)
	}
	if value < m.Range[0] || value > m.Range[1] {
		if converted {
			return Refuse(OutOfRange, FieldValue, "value %g %s (%g %s) is outside the physiological range [%g, %g] %s of %s",
				in.Value, in.Unit, value, m.Unit, m.Range[0], m.Range[1], m.Unit, m.ID)
		}
		return Refuse(OutOfRange, FieldValue, "value %g %s is outside the physiological range [%g, %g] of %s",
			value, m.Unit, m.Range[0], m.Range[1], m.ID)
	}
	quality := in.Quality
	if converted {
		quality |= uint32(vigilv1.QualityFlag_QUALITY_CONVERTED)
	}
	q, r := v.checkTime(in, nowMs)
	if r != nil {
		return r
	}
	quality |= q

	out.Metric = m.ID
	out.Value = value
	out.Unit = m.Unit
	out.EventTimeMs = in.EventTimeMs
	out.Sequence = in.Sequence
	out.Quality = quality
	out.Channel = in.Channel
	out.SourceCode = in.SourceCode
	if out.SourceCode == "" && in.LOINC != "" {
		out.SourceCode = "LOINC:" + in.LOINC
	}
	return nil
}

func (v *Validator) metric(in *Input) (*catalog.Metric, *Refusal) {
	var byID, byLOINC *catalog.Metric
	if in.Metric != "" {
		m, ok := v.cat.Lookup(in.Metric)
		if !ok {
			return nil, Refuse(UnknownMetric, FieldMetric, "metric %q is not in the catalogue (known: %v)", clip(in.Metric), v.cat.IDs())
		}
		byID = m
	}
	if in.LOINC != "" {
		m, ok := v.cat.ByLOINC(in.LOINC)
		if !ok {
			return nil, Refuse(UnknownMetric, FieldLOINC, "LOINC code %q is not in the catalogue", clip(in.LOINC))
		}
		byLOINC = m
	}
	switch {
	case byID == nil && byLOINC == nil:
		return nil, Refuse(MissingField, FieldMetric, "no metric: give a catalogue metric id or a LOINC code")
	case byID != nil && byLOINC != nil && byID != byLOINC:
		return nil, Refuse(MetricMismatch, FieldLOINC, "LOINC code %q is %s, not metric %q", in.LOINC, byLOINC.ID, byID.ID)
	case byID != nil:
		return byID, nil
	default:
		return byLOINC, nil
	}
}

func (v *Validator) checkTime(in *Input, nowMs int64) (uint32, *Refusal) {
	if !in.HasTime {
		return 0, Refuse(MissingField, FieldTime, "no event time")
	}
	t := in.EventTimeMs
	if t < 0 {
		return 0, Refuse(InvalidTime, FieldTime, "event time %d ms is before the Unix epoch", t)
	}
	if ahead := t - nowMs; ahead > v.lim.MaxFutureSkew.Milliseconds() {
		return 0, Refuse(FutureTime, FieldTime, "event time %s is %s ahead of ingest time %s (allowed: %s)",
			fmtMs(t), time.Duration(ahead)*time.Millisecond, fmtMs(nowMs), v.lim.MaxFutureSkew)
	}
	age := nowMs - t
	if v.lim.MaxAge > 0 && age > v.lim.MaxAge.Milliseconds() {
		return 0, Refuse(TooOld, FieldTime, "event time %s is %s old (allowed: %s)",
			fmtMs(t), time.Duration(age)*time.Millisecond, v.lim.MaxAge)
	}
	if v.lim.BackfillAge > 0 && age > v.lim.BackfillAge.Milliseconds() {
		return uint32(vigilv1.QualityFlag_QUALITY_BACKFILL), nil
	}
	return 0, nil
}

// CheckIDs checks the identifiers every sample needs: tenant, patient and
// device, each present and sane. It does not allocate when they are.
func CheckIDs(tenant, patient, device string) *Refusal {
	if r := checkID(FieldTenant, tenant, MaxTenantLen, true); r != nil {
		return r
	}
	if r := checkID(FieldPatient, patient, MaxPatientLen, false); r != nil {
		return r
	}
	return checkID(FieldDevice, device, MaxDeviceLen, false)
}

// CheckID checks one optional identifier-like value (e.g. a message id) of at
// most maxLen bytes: valid UTF-8, no control characters, no surrounding
// spaces. An empty value passes.
func CheckID(field, s string, maxLen int) *Refusal {
	if s == "" {
		return nil
	}
	return checkID(field, s, maxLen, false)
}

func checkID(field, s string, maxLen int, noSlash bool) *Refusal {
	if s == "" {
		return Refuse(MissingField, field, "no %s", field)
	}
	if len(s) > maxLen {
		return Refuse(InvalidID, field, "%s is %d bytes long (at most %d)", field, len(s), maxLen)
	}
	if s[0] == ' ' || s[len(s)-1] == ' ' {
		return Refuse(InvalidID, field, "%s %q has leading or trailing spaces", field, s)
	}
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c < 0x20 || c == 0x7f {
				return Refuse(InvalidID, field, "%s %q contains a control character at byte %d", field, s, i)
			}
			if noSlash && c == '/' {
				return Refuse(InvalidID, field, "%s %q contains '/'", field, s)
			}
			i++
			continue
		}
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && n <= 1 {
			return Refuse(InvalidID, field, "%s %q is not valid UTF-8 at byte %d", field, s, i)
		}
		if r >= 0x80 && r <= 0x9f || r == 0x2028 || r == 0x2029 {
			return Refuse(InvalidID, field, "%s %q contains a control character at byte %d", field, s, i)
		}
		i += n
	}
	return nil
}

// clip bounds an echoed value so refusal messages stay short.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

func fmtMs(ms int64) string {
	return time.UnixMilli(ms).UTC().Format("2006-01-02T15:04:05.000Z")
}
