package fhir

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/vigilhealth/vigil/ingest/mapping"
	"github.com/vigilhealth/vigil/ingest/validate"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// FHIR system URIs Vigil reads.
const (
	SystemLOINC = "http://loinc.org"
	SystemMDC   = "urn:iso:std:iso:11073:10101"
	SystemUCUM  = "http://unitsofmeasure.org"
)

// Panel codes (LOINC).
const (
	// LOINCBloodPressurePanel is the R4 vital-signs blood pressure panel
	// (components 8480-6 systolic, 8462-4 diastolic).
	LOINCBloodPressurePanel = "85354-9"
	// LOINCVitalSignsPanel is the R4 vital-signs panel (members by
	// hasMember).
	LOINCVitalSignsPanel = "85353-1"
)

// bpPanels are LOINC codes of observations whose values are components:
// 85354-9 "Blood pressure panel with all children optional" (the R4
// vital-signs profile), 55284-4 "Blood pressure systolic and diastolic" and
// 35094-2 "Blood pressure panel" (older feeds).
var bpPanels = map[string]bool{LOINCBloodPressurePanel: true, "55284-4": true, "35094-2": true}

// vitalLOINC are the LOINC codes of the R4 vital-signs profiles
// (hl7.org/fhir/R4/observation-vitalsigns.html); a code among them that the
// catalogue lacks is refused as unknown_metric, not as "not a vital sign".
var vitalLOINC = map[string]string{
	"85353-1": "vital signs panel", "9279-1": "respiratory rate", "8867-4": "heart rate",
	"2708-6": "oxygen saturation", "8310-5": "body temperature", "8302-2": "body height",
	"9843-4": "head circumference", "29463-7": "body weight", "39156-5": "body mass index",
	"85354-9": "blood pressure panel", "8480-6": "systolic blood pressure", "8462-4": "diastolic blood pressure",
}

// Codes maps source codes onto catalogue metrics and UCUM units: the
// ingest/mapping tables ((*mapping.Tables) satisfies it). Implementations
// must be safe for concurrent use.
type Codes interface {
	Metric(system, code string) (metricID string, ok bool)
	Unit(system, code string) (ucum string, ok bool)
}

// Binder resolves the patient bound to a device at an event time (the
// ingest/binding store). Implementations must be safe for concurrent use and
// must not block on I/O.
type Binder interface {
	Resolve(tenant, device string, atMs int64) (patient string, ok bool)
}

// refusal is one reason why (part of) a resource was not taken: an
// OperationOutcome issue and a dead letter.
type refusal struct {
	reason validate.Reason
	// expr is the FHIRPath of the offending element.
	expr string
	msg  string
}

// converted is what one Observation became.
type converted struct {
	// samples hold the validated samples, grouped per (patient, device).
	batches []*vigilv1.SampleBatch
	// refused is set when the resource as a whole was refused.
	refused *refusal
	// partial lists refusals of parts (components, contained members) of
	// an otherwise accepted resource.
	partial []refusal
	// notes are informational issues (ignored components, panel groupings).
	notes []string
	// grouping is true for a panel whose members are other entries of the
	// same Bundle: accepted, with no samples of its own.
	grouping bool
	// tenant, patient, device for dead letters.
	tenant, patient, device string
	// obs is the decoded resource (nil when it did not decode).
	obs *observation
}

func (c *converted) count() int {
	n := 0
	for _, b := range c.batches {
		n += len(b.Samples)
	}
	return n
}

// request is the context of converting one resource.
type request struct {
	tenant string
	nowMs  int64
	// root is the FHIRPath of the resource ("Observation" or
	// "Bundle.entry[3].resource").
	root string
	// inBundle reports whether a hasMember reference names another entry
	// of the same Bundle.
	inBundle func(ref string) bool
	// id is the logical id given to the resource (the batch's message id).
	id string
}

// convert turns the Observation in raw into samples or refusals.
func (h *Handler) convert(raw []byte, rq *request) *converted {
	out := &converted{tenant: rq.tenant}
	var obs observation
	if de := decodeJSON(raw, &obs, "Observation"); de != nil {
		expr := de.Path
		if expr == "" {
			expr = "Observation"
		}
		out.refused = &refusal{validate.MalformedMessage, rq.path(strings.TrimPrefix(expr, "Observation")), de.Msg}
		return out
	}
	out.obs = &obs
	if obs.ResourceType != "Observation" {
		if obs.ResourceType == "" {
			out.refused = &refusal{validate.MalformedMessage, rq.path(".resourceType"), "no resourceType: send an R4 Observation"}
		} else {
			out.refused = &refusal{validate.UnsupportedMessage, rq.path(".resourceType"),
				fmt.Sprintf("a %s is not taken here: Vigil takes Observation resources (vital signs)", clip(obs.ResourceType))}
		}
		return out
	}
	h.observation(&obs, rq, out, nil, 0)
	return out
}

// observation converts obs (at rq.root, or a contained member of parent).
func (h *Handler) observation(obs *observation, rq *request, out *converted, parent *member, depth int) {
	root := rq.root
	refuse := func(reason validate.Reason, elem, format string, args ...any) {
		out.refused = &refusal{reason, root + elem, fmt.Sprintf(format, args...)}
	}
	if len(obs.ModifierExtension) > 0 {
		refuse(validate.UnsupportedMessage, ".modifierExtension",
			"the Observation has a modifierExtension, which changes its meaning; Vigil does not understand it and may not ignore it")
		return
	}
	switch obs.Status {
	case "final", "amended", "corrected", "preliminary":
	case "entered-in-error":
		refuse(validate.AbsentValue, ".status", "status is entered-in-error: the observation was recorded in error and must not be used")
		return
	case "cancelled":
		refuse(validate.AbsentValue, ".status", "status is cancelled: the observation was not completed and has no result")
		return
	case "registered":
		refuse(validate.AbsentValue, ".status", "status is registered: the observation has no result yet; send it when final or preliminary")
		return
	case "unknown":
		refuse(validate.AbsentValue, ".status", "status is unknown: Vigil takes only final, amended, corrected or preliminary results")
		return
	case "":
		refuse(validate.MissingField, ".status", "no status: an Observation needs one (final, amended, corrected or preliminary)")
		return
	default:
		refuse(validate.MalformedMessage, ".status", "status %q is not an R4 observation status", clip(obs.Status))
		return
	}

	// What is observed.
	kind, metric, source, codeRf := h.classify(obs, root)
	if codeRf != nil {
		out.refused = codeRf
		return
	}
	if obs.DataAbsentReason != nil {
		refuse(validate.AbsentValue, ".dataAbsentReason", "no value: the source says %s", absentText(obs.DataAbsentReason))
		return
	}

	// Who and when.
	var m member
	if rf := h.identify(obs, rq, parent, &m); rf != nil {
		out.refused = rf
		return
	}
	if parent == nil {
		out.patient, out.device = m.patient, m.device
	}

	switch kind {
	case kindSingle:
		in, rf := h.quantityInput(&obs.valueChoice, root, metric, source)
		if rf != nil {
			out.refused = rf
			return
		}
		if rf := h.sample(in, rq, &m, root, "", out); rf != nil {
			out.refused = rf
		}
	case kindBPPanel:
		h.components(obs, rq, &m, out)
	case kindVitalsPanel:
		if depth > 0 {
			refuse(validate.UnsupportedMessage, ".hasMember", "a contained member is itself a panel: Vigil takes one level of members")
			return
		}
		h.members(obs, rq, &m, out, depth)
	}
}

type obsKind int

const (
	kindSingle obsKind = iota + 1
	kindBPPanel
	kindVitalsPanel
)

// classify finds what obs.code names: one metric, or a panel.
func (h *Handler) classify(obs *observation, root string) (obsKind, string, string, *refusal) {
	if obs.Code == nil {
		return 0, "", "", &refusal{validate.MissingField, root + ".code", "no code: an Observation needs one"}
	}
	codes := h.codes()
	var (
		metric, source  string
		kind            obsKind
		unmapped        string
		firstLOINCVital string
	)
	for _, c := range obs.Code.Coding {
		sys, known := mapping.CanonicalSystem(c.System)
		if !known || c.Code == "" {
			continue
		}
		if sys == mapping.SystemLOINC {
			if bpPanels[c.Code] {
				kind = kindBPPanel
			} else if c.Code == LOINCVitalSignsPanel {
				kind = kindVitalsPanel
			}
			if _, ok := vitalLOINC[c.Code]; ok && firstLOINCVital == "" {
				firstLOINCVital = c.Code
			}
		}
		id, ok := codes.Metric(sys, c.Code)
		if !ok {
			if sys == mapping.SystemMDC && unmapped == "" {
				unmapped = c.Code
				if c.Display != "" {
					unmapped += " (" + clip(c.Display) + ")"
				}
			}
			continue
		}
		if metric != "" && id != metric {
			return 0, "", "", &refusal{validate.MetricMismatch, root + ".code.coding",
				fmt.Sprintf("the codings name different metrics: %s (%s) and %s (%s:%s)", metric, source, id, sys, c.Code)}
		}
		if metric == "" {
			metric, source = id, sys+":"+c.Code
		}
	}
	switch {
	case metric != "":
		return kindSingle, metric, source, nil
	case kind != 0:
		return kind, "", "", nil
	case unmapped != "":
		return 0, "", "", &refusal{validate.UnmappedCode, root + ".code.coding",
			fmt.Sprintf("MDC code %s has no entry in the mapping tables; add it to a mapping file if it is a vital sign", unmapped)}
	case firstLOINCVital != "" || isVitalCategory(obs.Category):
		what := describe(obs.Code)
		return 0, "", "", &refusal{validate.UnknownMetric, root + ".code",
			fmt.Sprintf("%s is a vital sign but not one Vigil monitors (catalogue: %s)", what, strings.Join(h.val.Catalog().IDs(), ", "))}
	}
	return 0, "", "", &refusal{validate.NotVitalSign, root + ".code",
		fmt.Sprintf("not a vital sign: %s%s; Vigil takes vital signs coded with LOINC or IEEE 11073 MDC (%s)",
			describe(obs.Code), categoryText(obs.Category), strings.Join(h.val.Catalog().IDs(), ", "))}
}

func isVitalCategory(cats []codeableConcept) bool {
	for _, cc := range cats {
		for _, c := range cc.Coding {
			if c.Code == "vital-signs" {
				return true
			}
		}
	}
	return false
}

func categoryText(cats []codeableConcept) string {
	for _, cc := range cats {
		for _, c := range cc.Coding {
			if c.Code != "" {
				return " (category " + clip(c.Code) + ")"
			}
		}
	}
	return ""
}

// describe names a code for a human: "LOINC 15074-8 "Glucose..."".
func describe(cc *codeableConcept) string {
	for _, c := range cc.Coding {
		if c.Code == "" {
			continue
		}
		sys := c.System
		if s, ok := mapping.CanonicalSystem(c.System); ok {
			sys = s
		}
		d := ""
		if c.Display != "" {
			d = fmt.Sprintf(" %q", clip(c.Display))
		} else if name, ok := vitalLOINC[c.Code]; ok {
			d = " (" + name + ")"
		}
		return fmt.Sprintf("the code is %s %s%s", clip(sys), clip(c.Code), d)
	}
	if cc.Text != "" {
		return fmt.Sprintf("the code has no coding, only the text %q", clip(cc.Text))
	}
	return "the code is empty"
}

func absentText(cc *codeableConcept) string {
	for _, c := range cc.Coding {
		if c.Code != "" {
			if c.Display != "" {
				return fmt.Sprintf("%q (%s)", clip(c.Code), clip(c.Display))
			}
			return fmt.Sprintf("%q", clip(c.Code))
		}
	}
	if cc.Text != "" {
		return fmt.Sprintf("%q", clip(cc.Text))
	}
	return "the value is absent"
}

// member is who and when of one observation.
type member struct {
	patient, device string
	timeMs          int64
	quality         uint32
	// timeExpr is the FHIRPath of the effective[x] used.
	timeExpr string
}

// identify reads subject, device and effective[x] (falling back to
// parent's for a contained member), resolving the patient through the
// device binding when there is no subject.
func (h *Handler) identify(obs *observation, rq *request, parent *member, m *member) *refusal {
	root := rq.root
	// Device.
	switch {
	case obs.Device != nil:
		dev, rf := refID(obs.Device, root+".device", "Device", "DeviceMetric")
		if rf != nil {
			return rf
		}
		if dev == "" {
			dev = h.cfg.DefaultDevice
		}
		m.device = dev
	case parent != nil:
		m.device = parent.device
	default:
		m.device = h.cfg.DefaultDevice
	}
	// Effective time.
	if rf := h.effective(obs, root, parent, m); rf != nil {
		return rf
	}
	// Patient.
	switch {
	case obs.Subject != nil:
		if ref := obs.Subject.Reference; strings.HasPrefix(ref, "#") {
			p, rf := containedPatientID(obs, ref[1:], root+".subject")
			if rf != nil {
				return rf
			}
			m.patient = p
			return nil
		}
		p, rf := refID(obs.Subject, root+".subject", "Patient")
		if rf != nil {
			return rf
		}
		if p == "" {
			return &refusal{validate.MissingField, root + ".subject",
				"the subject names no patient (only a display): give reference Patient/<id> or an identifier"}
		}
		m.patient = p
	case parent != nil:
		m.patient = parent.patient
	case obs.Device != nil && h.binder != nil:
		p, ok := h.binder.Resolve(rq.tenant, m.device, m.timeMs)
		if !ok {
			return &refusal{validate.UnboundDevice, root + ".device",
				fmt.Sprintf("no subject, and no patient is bound to device %q at %s", clip(m.device), fmtMs(m.timeMs))}
		}
		m.patient = p
	case obs.Device != nil:
		return &refusal{validate.MissingField, root + ".subject",
			"no subject: name the patient (Patient/<id>); this server resolves no device bindings"}
	default:
		return &refusal{validate.MissingField, root + ".subject", "no subject: name the patient (Patient/<id>)"}
	}
	return nil
}

// refID reads the id of a reference to one of types: "Type/id", an absolute
// URL ending in Type/id (with or without /_history/n), or a logical
// reference by identifier. It returns "" when the reference has only a
// display.
func refID(r *reference, expr string, types ...string) (string, *refusal) {
	typeOK := func(t string) bool {
		for _, want := range types {
			if t == want {
				return true
			}
		}
		return false
	}
	if r.Type != "" && !typeOK(r.Type) {
		return "", &refusal{validate.InvalidID, expr + ".type",
			fmt.Sprintf("the reference is to a %s: it must be to a %s", clip(r.Type), strings.Join(types, " or "))}
	}
	if ref := r.Reference; ref != "" {
		if strings.HasPrefix(ref, "urn:uuid:") || strings.HasPrefix(ref, "urn:oid:") || strings.HasPrefix(ref, "#") {
			return "", &refusal{validate.InvalidID, expr + ".reference",
				fmt.Sprintf("reference %q cannot be resolved to a %s id here: use %s/<id> or an identifier", clip(ref), types[0], types[0])}
		}
		parts := strings.Split(ref, "/")
		if n := len(parts); n >= 4 && parts[n-2] == "_history" {
			parts = parts[:n-2]
		}
		n := len(parts)
		if n < 2 || !typeOK(parts[n-2]) || parts[n-1] == "" {
			return "", &refusal{validate.InvalidID, expr + ".reference",
				fmt.Sprintf("reference %q is not to a %s: want %s/<id>", clip(ref), strings.Join(types, " or "), types[0])}
		}
		return parts[n-1], nil
	}
	if r.Identifier != nil && r.Identifier.Value != "" {
		return r.Identifier.Value, nil
	}
	return "", nil
}

func containedPatientID(obs *observation, id, expr string) (string, *refusal) {
	for _, raw := range obs.Contained {
		var p containedPatient
		if json.Unmarshal(raw, &p) != nil || p.ID != id {
			continue
		}
		if p.ResourceType != "Patient" {
			return "", &refusal{validate.InvalidID, expr, fmt.Sprintf("the subject #%s is a contained %s, not a Patient", clip(id), clip(p.ResourceType))}
		}
		for _, ident := range p.Identifier {
			if ident.Value != "" {
				return ident.Value, nil
			}
		}
		return "", &refusal{validate.MissingField, expr,
			fmt.Sprintf("the subject is the contained Patient #%s, which has no identifier: name the patient by Patient/<id> or an identifier", clip(id))}
	}
	return "", &refusal{validate.InvalidID, expr, fmt.Sprintf("the subject #%s names no contained resource", clip(id))}
}

func (h *Handler) effective(obs *observation, root string, parent *member, m *member) *refusal {
	var text, expr string
	switch {
	case obs.EffectiveDateTime != nil:
		text, expr = *obs.EffectiveDateTime, root+".effectiveDateTime"
	case obs.EffectiveInstant != nil:
		text, expr = *obs.EffectiveInstant, root+".effectiveInstant"
	case obs.EffectivePeriod != nil:
		if obs.EffectivePeriod.Start == nil {
			return &refusal{validate.MissingField, root + ".effectivePeriod.start", "effectivePeriod has no start: Vigil takes the start as the measurement time"}
		}
		text, expr = *obs.EffectivePeriod.Start, root+".effectivePeriod.start"
	case obs.EffectiveTiming != nil:
		return &refusal{validate.InvalidTime, root + ".effectiveTiming", "effectiveTiming is not taken: give effectiveDateTime, effectiveInstant or effectivePeriod"}
	case parent != nil:
		m.timeMs, m.quality, m.timeExpr = parent.timeMs, parent.quality, parent.timeExpr
		return nil
	default:
		return &refusal{validate.MissingField, root + ".effective[x]", "no effective time: a vital sign needs the time it was measured (effectiveDateTime)"}
	}
	ms, prec, err := parseDateTime(text)
	if err != nil {
		return &refusal{validate.InvalidTime, expr, err.Error()}
	}
	m.timeExpr = expr
	switch {
	case prec == precTime:
	case prec == precDay && h.cfg.AcceptDateOnly:
		m.quality |= uint32(vigilv1.QualityFlag_QUALITY_QUESTIONABLE)
	default:
		hint := ""
		if prec == precDay {
			hint = "; fhir.accept_date_only takes such dates as 00:00 UTC"
		}
		return &refusal{validate.InvalidTime, expr,
			fmt.Sprintf("%s %s has %s precision only: a vital sign needs the time it was measured (hh:mm:ss with a time zone)%s",
				expr[strings.LastIndexByte(expr, '.')+1:], clip(text), prec, hint)}
	}
	m.timeMs = ms
	return nil
}

// quantityInput reads value[x] as a Quantity for metric.
func (h *Handler) quantityInput(v *valueChoice, elem, metric, source string) (*validate.Input, *refusal) {
	if v.ValueQuantity == nil {
		if t := v.otherType(); t != "" {
			return nil, &refusal{validate.UnsupportedValue, elem + "." + t,
				fmt.Sprintf("%s is not taken: a vital sign's value is a valueQuantity", t)}
		}
		return nil, &refusal{validate.MissingField, elem + ".value[x]", "no value and no dataAbsentReason"}
	}
	q := v.ValueQuantity
	qe := elem + ".valueQuantity"
	if len(q.Value) == 0 || string(q.Value) == "null" {
		return nil, &refusal{validate.MissingField, qe + ".value", "the valueQuantity has no value"}
	}
	text := string(q.Value)
	if c := text[0]; c != '-' && (c < '0' || c > '9') {
		return nil, &refusal{validate.MalformedMessage, qe + ".value", fmt.Sprintf("value %s is not a JSON number (a FHIR decimal)", clip(text))}
	}
	if q.Comparator != "" {
		return nil, &refusal{validate.UnsupportedValue, qe + ".comparator",
			fmt.Sprintf("the value is %s%s, a bound, not a measurement", clip(q.Comparator), clip(text))}
	}
	val, err := strconv.ParseFloat(text, 64)
	if err != nil || math.IsInf(val, 0) || math.IsNaN(val) {
		return nil, &refusal{validate.NotFinite, qe + ".value", fmt.Sprintf("value %s is not a finite float64", clip(text))}
	}
	unit, rf := h.unit(q, qe)
	if rf != nil {
		return nil, rf
	}
	return &validate.Input{Metric: metric, SourceCode: source, Value: val, HasValue: true, Unit: unit}, nil
}

// unit resolves a Quantity's unit to UCUM.
func (h *Handler) unit(q *quantity, qe string) (string, *refusal) {
	codes := h.codes()
	sys, known := mapping.CanonicalSystem(q.System)
	switch {
	case q.System != "" && !known:
		return "", &refusal{validate.UnitNotConvertible, qe + ".system",
			fmt.Sprintf("unit system %q is not UCUM (%s) or IEEE 11073 MDC", clip(q.System), SystemUCUM)}
	case q.System != "" && sys == mapping.SystemMDC:
		if q.Code == "" {
			return "", &refusal{validate.MissingField, qe + ".code", "an MDC unit needs a code"}
		}
		u, ok := codes.Unit(mapping.SystemMDC, q.Code)
		if !ok {
			return "", &refusal{validate.UnmappedCode, qe + ".code", fmt.Sprintf("MDC unit code %s has no entry in the mapping tables", clip(q.Code))}
		}
		return u, nil
	case q.System != "" && sys != mapping.SystemUCUM:
		return "", &refusal{validate.UnitNotConvertible, qe + ".system", fmt.Sprintf("unit system %q is not a unit system", clip(q.System))}
	case q.Code != "":
		if u, ok := codes.Unit(mapping.SystemUCUM, q.Code); ok {
			return u, nil
		}
		return q.Code, nil
	case q.Unit != "":
		// Only the display unit: take it when it is (an alias of) UCUM.
		if u, ok := codes.Unit(mapping.SystemUCUM, q.Unit); ok {
			return u, nil
		}
		return "", &refusal{validate.UnitNotConvertible, qe + ".unit",
			fmt.Sprintf("unit %q is not a UCUM code: give system %s and code", clip(q.Unit), SystemUCUM)}
	}
	return "", &refusal{validate.MissingField, qe + ".code", "the valueQuantity has no unit: give system " + SystemUCUM + " and code"}
}

// sample validates in for m and adds it to out's batches.
func (h *Handler) sample(in *validate.Input, rq *request, m *member, elem, _ string, out *converted) *refusal {
	in.Tenant, in.Patient, in.Device = rq.tenant, m.patient, m.device
	in.EventTimeMs, in.HasTime, in.Quality = m.timeMs, true, m.quality
	s := new(vigilv1.Sample)
	if rf := h.val.Sample(in, rq.nowMs, s); rf != nil {
		return &refusal{rf.Reason, fieldExpr(rf.Field, elem, rq, m), rf.Message}
	}
	for _, b := range out.batches {
		if b.Patient == m.patient && b.Device == m.device {
			b.Samples = append(b.Samples, s)
			return nil
		}
	}
	out.batches = append(out.batches, &vigilv1.SampleBatch{Tenant: rq.tenant, Patient: m.patient, Device: m.device,
		Source: vigilv1.Source_SOURCE_FHIR, MessageId: rq.id, Samples: []*vigilv1.Sample{s}})
	return nil
}

// fieldExpr maps a validate field onto the FHIRPath of the element.
func fieldExpr(field, elem string, rq *request, m *member) string {
	switch field {
	case validate.FieldValue:
		return elem + ".valueQuantity.value"
	case validate.FieldUnit:
		return elem + ".valueQuantity.code"
	case validate.FieldTime:
		return m.timeExpr
	case validate.FieldPatient:
		return rq.root + ".subject"
	case validate.FieldDevice:
		return rq.root + ".device"
	case validate.FieldMetric, validate.FieldLOINC:
		return elem + ".code"
	case validate.FieldTenant:
		return "tenant"
	}
	return elem
}

// components converts a blood-pressure panel's components.
func (h *Handler) components(obs *observation, rq *request, m *member, out *converted) {
	root := rq.root
	codes := h.codes()
	var parts []refusal
	taken := 0
	for i := range obs.Component {
		c := &obs.Component[i]
		ce := fmt.Sprintf("%s.component[%d]", root, i)
		if c.Code == nil {
			parts = append(parts, refusal{validate.MissingField, ce + ".code", "the component has no code"})
			continue
		}
		metric, source := "", ""
		for _, cd := range c.Code.Coding {
			sys, known := mapping.CanonicalSystem(cd.System)
			if !known {
				continue
			}
			if id, ok := codes.Metric(sys, cd.Code); ok {
				metric, source = id, sys+":"+cd.Code
				break
			}
		}
		if metric == "" {
			out.notes = append(out.notes, fmt.Sprintf("%s: ignored: %s is not a vital sign Vigil monitors", ce, strings.TrimPrefix(describe(c.Code), "the code is ")))
			continue
		}
		taken++
		if len(c.ModifierExtension) > 0 {
			parts = append(parts, refusal{validate.UnsupportedMessage, ce + ".modifierExtension", "the component has a modifierExtension Vigil does not understand"})
			continue
		}
		if c.DataAbsentReason != nil {
			parts = append(parts, refusal{validate.AbsentValue, ce + ".dataAbsentReason",
				fmt.Sprintf("no %s value: the source says %s", metric, absentText(c.DataAbsentReason))})
			continue
		}
		in, rf := h.quantityInput(&c.valueChoice, ce, metric, source)
		if rf == nil {
			rf = h.sample(in, rq, m, ce, "", out)
		}
		if rf != nil {
			parts = append(parts, *rf)
		}
	}
	switch {
	case taken == 0:
		out.refused = &refusal{validate.MissingField, root + ".component",
			"the blood-pressure panel has no systolic (8480-6), diastolic (8462-4) or mean (8478-0) component"}
	case out.count() == 0:
		// Nothing taken: the resource is refused for its first reason;
		// the other components are named as notes.
		out.refused = &parts[0]
		for _, p := range parts[1:] {
			out.notes = append(out.notes, p.expr+": "+p.msg)
		}
	default:
		out.partial = append(out.partial, parts...)
	}
}

// members converts a vital-signs panel: contained members become samples;
// members that are other entries of the same Bundle are taken there; any
// other member reference refuses the panel.
func (h *Handler) members(obs *observation, rq *request, m *member, out *converted, depth int) {
	root := rq.root
	if len(obs.HasMember) == 0 {
		out.refused = &refusal{validate.MissingField, root + ".hasMember", "the vital-signs panel has no members"}
		return
	}
	inBundle := 0
	for i, ref := range obs.HasMember {
		me := fmt.Sprintf("%s.hasMember[%d]", root, i)
		r := ref.Reference
		switch {
		case strings.HasPrefix(r, "#"):
			raw := containedByID(obs, r[1:])
			if raw == nil {
				out.refused = &refusal{validate.InvalidID, me, fmt.Sprintf("member %q names no contained resource", clip(r))}
				return
			}
			var sub observation
			if de := decodeJSON(raw, &sub, "Observation"); de != nil || sub.ResourceType != "Observation" {
				out.refused = &refusal{validate.MalformedMessage, me, fmt.Sprintf("member %q is not a valid contained Observation", clip(r))}
				return
			}
			subRq := *rq
			subRq.root = fmt.Sprintf("%s.contained.where(id='%s')", root, clip(r[1:]))
			var sc converted
			sc.batches = out.batches
			h.observation(&sub, &subRq, &sc, m, depth+1)
			if sc.refused != nil {
				out.partial = append(out.partial, *sc.refused)
				out.notes = append(out.notes, sc.notes...)
				continue
			}
			out.batches = sc.batches
			out.partial = append(out.partial, sc.partial...)
			out.notes = append(out.notes, sc.notes...)
		case rq.inBundle != nil && rq.inBundle(r):
			inBundle++
		default:
			out.refused = &refusal{validate.UnsupportedMessage, me,
				fmt.Sprintf("the vital-signs panel carries no values itself and its member %q is not in this request (Vigil does not store or fetch Observations): send the members in the same Bundle, or as contained resources", clip(r))}
			return
		}
	}
	switch {
	case out.count() > 0:
	case len(out.partial) > 0:
		out.refused = &out.partial[0]
		out.partial = nil
	case inBundle == len(obs.HasMember):
		out.grouping = true
		out.notes = append(out.notes, fmt.Sprintf("%s: a panel of %d members that are entries of this Bundle; their values are taken there", root, inBundle))
	}
}

func containedByID(obs *observation, id string) json.RawMessage {
	for _, raw := range obs.Contained {
		var p struct {
			ID string `json:"id"`
		}
		if json.Unmarshal(raw, &p) == nil && p.ID == id {
			return raw
		}
	}
	return nil
}

// path joins rq.root and an element path starting with '.' (or "").
func (rq *request) path(elem string) string { return rq.root + elem }
