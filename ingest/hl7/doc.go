// Package hl7 reads HL7 v2 messages (versions 2.3 to 2.8, ER7 "pipe and
// hat" encoding) and turns the ones Vigil takes into canonical samples and
// binding changes; it writes the original-mode ACKs that answer them. It
// does no I/O: ingest/mllp carries the bytes and publishes the results.
//
// Parsing (Parse) indexes a message in place: encoding characters come from
// MSH-1 and MSH-2; segments may end with \r, \n or \r\n; repetitions,
// components and sub-components are sliced on demand; escape sequences (\F\
// \S\ \T\ \R\ \E\ \Xhh\ \.br\, formatting escapes dropped) are decoded by
// Field.String.
//
// ORU^R01 (IHE PCD-01) becomes samples (Decoder.DecodeORU):
//
//   - OBX-2 NM, or SN holding a plain number, is a value; NA (waveform) goes
//     to the waveform path when configured; anything else is refused with
//     unsupported_value, one dead letter per refused OBX (field "OBX[n]-2",
//     n counting the message's OBX segments from 1);
//   - OBX-3 maps onto a metric: MDC codes (numeric or reference id) and LOINC
//     through Codes; an unknown MDC or local code is unmapped_code, a LOINC
//     code outside the catalogue not_vital_sign;
//   - OBX-6 maps onto UCUM: MDC unit codes through Codes (unknown:
//     unmapped_code), UCUM (or unnamed) units as given, for validation;
//   - the event time is OBX-14, else OBR-7, else MSH-7 (any HL7 precision,
//     with or without UTC offset; without one the Decoder's zone, UTC by
//     default);
//   - the device is OBX-18, else the OBX-18 of the containment row of the
//     same MDS (first part of OBX-4), else MSH-4, else MSH-3; the channel is
//     OBX-4;
//   - the patient is PID-3 (the MR identifier, else the first); without it,
//     the patient bound to the device, else to the bed (PV1-3); unresolved,
//     the samples become an unbound_device dead letter carrying the batch
//     for a later re-drive;
//   - OBX-11 statuses D, W, X, N, I, O and sentinel values (-999, -9999...)
//     are absent_value;
//   - every sample then goes through ingest/validate (units, ranges, time).
//
// ADT A01/A02/A03/A04/A08/A11/A12/A13 become binding.ADTEvents (DecodeADT)
// for ingest/binding's Store.ApplyADT.
package hl7
