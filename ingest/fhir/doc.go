// Package fhir is the FHIR R4 ingest path: HTTP handlers that take
// Observations of the vital-signs profile, one at a time or in a batch or
// transaction Bundle, turn them into canonical samples (package validate),
// publish them to vigil.samples.v1 and every refusal to vigil.deadletter.v1
// (package publish), and answer as a FHIR server does, only after Kafka
// acknowledged both.
//
// # Endpoints
//
//	POST /fhir/Observation   one Observation (create)
//	POST /fhir               a Bundle of type batch or transaction
//	GET  /fhir/metadata      a minimal CapabilityStatement
//
// Requests are application/fhir+json (application/json is accepted too).
// The tenant is the value of the header fhir.tenant_header (default
// X-Vigil-Tenant), else fhir.default_tenant.
//
// # What an Observation becomes
//
//   - status final, amended, corrected or preliminary is taken;
//     entered-in-error, cancelled, registered and unknown are refused
//     (absent_value).
//   - code: the first coding that the mapping tables (ingest/mapping: LOINC
//     through the catalogue and the tables, IEEE 11073 MDC
//     urn:iso:std:iso:11073:10101 through the tables) map onto a catalogue
//     metric; codings naming different metrics are refused (metric_mismatch).
//     An MDC code with no entry is refused as unmapped_code; a vital sign of
//     the R4 profile that Vigil does not monitor (body height, BMI, head
//     circumference) as unknown_metric; anything else (laboratory, survey,
//     social history, exam, genetics...) as not_vital_sign.
//   - valueQuantity (value, UCUM system http://unitsofmeasure.org and code,
//     or an MDC unit code; a display unit alone only when it is a UCUM alias
//     the tables know) is converted to the metric's canonical unit. Another
//     value[x] is unsupported_value; a comparator (">60") is
//     unsupported_value; dataAbsentReason is absent_value.
//   - effectiveDateTime, effectiveInstant or effectivePeriod.start is the
//     event time. A dateTime needs a time of day and a time zone: a day
//     alone ("2012-09-17") is refused (invalid_time) unless
//     fhir.accept_date_only takes it as 00:00 UTC flagged questionable;
//     a year or month alone is always refused.
//   - subject: "Patient/<id>" (or an absolute URL ending so), a logical
//     reference by identifier (its value), or a contained Patient ("#x")
//     with an identifier. Without a subject, the patient bound to the
//     device at the event time (Options.Binder) is used; none bound is
//     unbound_device.
//   - device: "Device/<id>" or "DeviceMetric/<id>" (or an identifier); absent
//     means fhir.default_device.
//   - Blood-pressure panels (LOINC 85354-9, 55284-4, 35094-2): each
//     component mapped to a metric (8480-6 systolic, 8462-4 diastolic,
//     8478-0 mean) becomes a sample; other components are ignored (noted in
//     the outcome). A component with dataAbsentReason is refused on its own
//     (warning issue, dead letter absent_value) while the others are taken;
//     when none is left the resource is refused.
//   - Vital-signs panels (85353-1) carry no values themselves. Members
//     contained in the panel ("#id") are taken like components (inheriting
//     the panel's subject, device and time when they have none). Members
//     that are other entries of the same Bundle (by fullUrl or
//     Observation/<id>) are taken as those entries; the panel entry is then
//     answered "200 OK" with no samples of its own. A member referring to
//     anything else is refused (unsupported_message): Vigil neither stores
//     nor fetches Observations, so it would be a panel without values.
//   - A modifierExtension (on the resource or a component) is refused
//     (unsupported_message): it changes the meaning and may not be ignored.
//     Other unknown elements are ignored.
//
// Every accepted resource is one SampleBatch per (patient, device), source
// SOURCE_FHIR, message id = the logical id Vigil assigned.
//
// # Answers
//
//   - create: 201 Created with Location <base>/fhir/Observation/<id>/_history/1
//     and the created resource (its id and meta assigned); Prefer:
//     return=minimal gives no body, return=OperationOutcome an outcome
//     listing the samples taken. When a component was refused the outcome is
//     returned by default, so the refusal is not hidden.
//   - Bundle: 200 with a batch-response or transaction-response Bundle, one
//     entry.response per entry, in order: "201 Created" with location, "200
//     OK" for a panel grouping other entries, or "400 Bad Request" / "422
//     Unprocessable Entity" with entry.response.outcome. A batch's entries
//     are independent. A transaction is all or nothing: when any entry is
//     refused nothing is published, and the answer is 400 with an
//     OperationOutcome listing every refused entry.
//   - Errors are OperationOutcome with issue severity, code (structure,
//     required, value, not-supported, business-rule, not-found, too-costly,
//     transient...), details.coding (system urn:vigil:refusal-reason, code =
//     the dead letter's reason), diagnostics (a sentence) and expression (the
//     FHIRPath, e.g. "Observation.valueQuantity.code" or
//     "Bundle.entry[2].resource.effectiveDateTime"). 400 is for content that
//     is not valid FHIR or not what the endpoint takes (malformed JSON, with
//     line, column and byte offset; missing elements; other resource types);
//     422 for valid FHIR that Vigil refuses (not a vital sign, no value,
//     unit, range, time); 413 for bodies over http.max_body_bytes or
//     Bundles over fhir.max_bundle_entries; 415 for other media types.
//   - 503 with Retry-After and an OperationOutcome (code transient) when
//     Kafka did not acknowledge in time: nothing counts as accepted, retry
//     the request. 500 (code exception) when Kafka refused permanently.
//
// Every refusal is one dead letter with its reason, message, FHIRPath (in
// field), tenant, patient and device when known, and the raw resource bytes
// (the entry's resource for a Bundle entry; the body when the request as a
// whole was refused). Dead letters are acknowledged before a 4xx is sent.
package fhir
