package hl7

import (
	"time"

	"github.com/vigilhealth/vigil/ingest/binding"
	"github.com/vigilhealth/vigil/ingest/validate"
)

// ADTKind maps an ADT trigger event onto the binding change it implies
// (ingest/binding's ADT kinds): A01 admit, A04 register and A13 cancel
// discharge admit; A02 transfer and A12 cancel transfer transfer (for A12,
// HL7 puts the location the patient returns to in PV1-3 and the one left
// in PV1-6, so it is a transfer like any other); A03 discharge and A11
// cancel admit discharge; A08 update. Other triggers imply no change (ok
// false).
func ADTKind(trigger string) (binding.ADTKind, bool) {
	switch trigger {
	case "A01", "A04", "A13":
		return binding.ADTAdmit, true
	case "A02", "A12":
		return binding.ADTTransfer, true
	case "A03", "A11":
		return binding.ADTDischarge, true
	case "A08":
		return binding.ADTUpdate, true
	}
	return "", false
}

// DecodeADT reads the binding change of an ADT message for
// binding.Store.ApplyADT: the kind from the trigger (ADTKind), the patient
// from PID-3, the bed from PV1-3 and the prior bed from PV1-6 (as BedKeys),
// the time from EVN-2, else EVN-6, else MSH-7, else nowMs. The caller sets
// Tenant and SetBy. It returns nil, nil for a trigger that implies no
// change, and an Issue for a message that needs a patient (or, for a
// transfer, a bed) and has none.
func DecodeADT(m *Message, trigger string, zone *time.Location, nowMs int64) (*binding.ADTEvent, *Issue) {
	kind, ok := ADTKind(trigger)
	if !ok {
		return nil, nil
	}
	ev := &binding.ADTEvent{Kind: kind, AtMs: nowMs}
	msh7 := m.MSH().Field(7).Raw()
	if evn, ok := m.First("EVN"); ok {
		if t, err := ParseTime(evn.Field(2).Raw(), zone); err == nil {
			ev.AtMs = t
		} else if t, err := ParseTime(evn.Field(6).Raw(), zone); err == nil {
			ev.AtMs = t
		} else if t, err := ParseTime(msh7, zone); err == nil {
			ev.AtMs = t
		}
	} else if t, err := ParseTime(msh7, zone); err == nil {
		ev.AtMs = t
	}
	if pid, ok := m.First("PID"); ok {
		ev.Patient = PatientID(pid.Field(3))
	}
	if pv1, ok := m.First("PV1"); ok {
		ev.Bed = LocationKey(pv1.Field(3))
		ev.PriorBed = LocationKey(pv1.Field(6))
	}
	if ev.Patient == "" {
		return nil, &Issue{Segment: "PID", Sequence: 1, Field: 3, Code: CodeRequiredMissing, Severity: SeverityError,
			Reason: validate.MissingField, Message: "ADT^" + trigger + " without a patient id (PID-3)"}
	}
	if kind == binding.ADTTransfer && ev.Bed == "" {
		return nil, &Issue{Segment: "PV1", Sequence: 1, Field: 3, Code: CodeRequiredMissing, Severity: SeverityError,
			Reason: validate.MissingField, Message: "ADT^" + trigger + " (transfer) without the new location (PV1-3)"}
	}
	return ev, nil
}
