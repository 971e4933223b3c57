package hl7

import (
	"time"

	"github.com/vigilhealth/vigil/ingest/validate"
)

// BindingOp is one change to the device/bed → patient bindings that an ADT
// message implies.
type BindingOp struct {
	// Kind is OpBind, OpRelease (the location's binding ends) or
	// OpReleasePatient (every binding of the patient ends).
	Kind OpKind
	// Location is the bed key (BedKey) bound or released.
	Location string
	Patient  string
	// AtMs is when the change takes effect (EVN-2, else MSH-7), Unix ms.
	AtMs int64
}

// OpKind names a binding change.
type OpKind int

// Binding changes.
const (
	OpBind OpKind = iota + 1
	OpRelease
	OpReleasePatient
)

// String names the kind.
func (k OpKind) String() string {
	switch k {
	case OpBind:
		return "bind"
	case OpRelease:
		return "release"
	case OpReleasePatient:
		return "release_patient"
	}
	return "unknown"
}

// DecodeADT computes the binding changes of an ADT message: admit (A01),
// register (A04) and update (A08) bind PV1-3 to the patient (PID-3);
// transfer (A02) releases the prior location PV1-6 and binds PV1-3;
// discharge (A03) and cancel admit (A11) release the patient; cancel
// transfer (A12) releases PV1-3 and binds PV1-6 again; cancel discharge
// (A13) binds PV1-3 again. Other ADT events imply no change. The time is
// EVN-2, else MSH-7, else nowMs. A message that needs a patient and has
// none gives an Issue.
func DecodeADT(m *Message, trigger string, zone *time.Location, nowMs int64) ([]BindingOp, *Issue) {
	at := nowMs
	if evn, ok := m.First("EVN"); ok {
		if t, err := ParseTime(evn.Field(2).Raw(), zone); err == nil {
			at = t
		} else if t, err := ParseTime(evn.Field(6).Raw(), zone); err == nil {
			at = t
		} else if t, err := ParseTime(m.MSH().Field(7).Raw(), zone); err == nil {
			at = t
		}
	} else if t, err := ParseTime(m.MSH().Field(7).Raw(), zone); err == nil {
		at = t
	}
	var patient, bed, prior string
	if pid, ok := m.First("PID"); ok {
		patient = PatientID(pid.Field(3))
	}
	if pv1, ok := m.First("PV1"); ok {
		bed = LocationKey(pv1.Field(3))
		prior = LocationKey(pv1.Field(6))
	}
	var ops []BindingOp
	bind := func(loc string) {
		if loc != "" {
			ops = append(ops, BindingOp{Kind: OpBind, Location: loc, Patient: patient, AtMs: at})
		}
	}
	release := func(loc string) {
		if loc != "" {
			ops = append(ops, BindingOp{Kind: OpRelease, Location: loc, Patient: patient, AtMs: at})
		}
	}
	switch trigger {
	case "A01", "A04", "A08", "A13":
		bind(bed)
	case "A02":
		if prior != bed {
			release(prior)
		}
		bind(bed)
	case "A03", "A11":
		ops = append(ops, BindingOp{Kind: OpReleasePatient, Patient: patient, AtMs: at})
	case "A12":
		release(bed)
		bind(prior)
	}
	if len(ops) > 0 && patient == "" {
		return nil, &Issue{Segment: "PID", Sequence: 1, Field: 3, Code: CodeRequiredMissing, Severity: SeverityError,
			Reason: validate.MissingField, Message: "ADT^" + trigger + " without a patient id (PID-3)"}
	}
	return ops, nil
}
