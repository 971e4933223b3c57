package httpjson

import (
	"time"

	"github.com/vigilhealth/vigil/ingest/validate"
)

// Resolver gives a device or bed its patient at an event time
// (ingest/binding.Store). It must be safe for concurrent use and fast: it
// runs once per sample that names a device but no patient.
type Resolver interface {
	Resolve(tenant, deviceOrBed string, atMs int64) (patient string, ok bool)
}

// SetResolver makes samples that name a device but no patient take the
// patient bound to the device at their event time; a sample whose device is
// unbound then is refused with reason unbound_device (its dead letter
// carries the decoded sample, with no patient, for `vigil deadletter
// redrive`). Without a resolver (nil, the default) the patient is required.
// Call it before the handler serves.
func (h *Handler) SetResolver(r Resolver) { h.resolver = r }

// resolvePatient fills in.Patient from the resolver, or returns the
// unbound_device refusal of sample i. A sample without a time is resolved
// at now (validation then refuses it for its missing time).
func (h *Handler) resolvePatient(in *validate.Input, i int, s *sampleIn, now int64) *validate.Refusal {
	at := in.EventTimeMs
	if !in.HasTime {
		at = now
	}
	if p, ok := h.resolver.Resolve(in.Tenant, in.Device, at); ok {
		in.Patient = p
		return nil
	}
	return validate.Refuse(validate.UnboundDevice, fieldPath(i, validate.FieldDevice, s),
		"no patient is bound to device %q of tenant %q at %s: bind it (PUT /v1/devices/{id}/binding or an HL7 ADT admit), then re-drive (vigil deadletter redrive --reason unbound_device)",
		in.Device, in.Tenant, time.UnixMilli(at).UTC().Format("2006-01-02T15:04:05.000Z"))
}
