// Package httpjson is the HTTP JSON ingest path: an http.Handler for
// POST /v1/samples that decodes a batch of samples, validates each one with
// package validate, writes the valid ones to vigil.samples.v1 and the refused
// ones to vigil.deadletter.v1 through package publish, and answers only after
// Kafka acknowledged both.
//
// # Request (schema v1, stable)
//
//	POST /v1/samples
//	Content-Type: application/json
//
//	{
//	  "tenant":     "st-mary",          // default for every sample
//	  "patient":    "p-001",            // default for every sample
//	  "device":     "bed-7",            // default for every sample
//	  "message_id": "gw-42-000017",     // optional; generated when absent
//	  "samples": [
//	    {"metric": "heart_rate", "value": 72, "unit": "/min",
//	     "time": "2026-11-23T10:00:00.250Z", "seq": 17},
//	    {"loinc": "59408-5", "value": 0.97, "unit": "1",
//	     "time_ms": 1795428000250, "seq": 18, "channel": "spo2-1"},
//	    {"patient": "p-002", "device": "bed-8", "message_id": "gw-42-000018",
//	     "metric": "body_temperature", "value": 101.3, "unit": "[degF]",
//	     "time_ms": 1795428000250}
//	  ]
//	}
//
// Top-level fields: tenant, patient, device and message_id are strings, each
// a default that a sample may override (so one request can carry many beds);
// samples is a non-empty array of at most ingest.max_batch_samples objects.
//
// Sample fields:
//   - metric: a catalogue id (heart_rate, spo2, respiratory_rate,
//     body_temperature, systolic_bp, diastolic_bp, mean_arterial_pressure,
//     fio2, oxygen_flow, consciousness, glucose, body_weight, steps), or
//   - loinc: a LOINC code the catalogue knows (e.g. "8867-4"), or, with
//     the mapping tables (SetCodes, as `vigil` runs it), one the tables map
//     (e.g. "2708-6" → spo2, or a code a hospital added in
//     ingest.mapping_dir); when both are given they must name the same
//     metric;
//   - value: a JSON number;
//   - unit: a UCUM unit convertible to the metric's canonical unit (e.g.
//     "[degF]" → Cel, "kPa" → mm[Hg], "1" (fraction) → %), or, with the
//     mapping tables, an alias they map onto one ("bpm", "mmHg", "degF");
//     absent means the canonical unit;
//   - time: an RFC 3339 timestamp, or time_ms: Unix epoch milliseconds (an
//     integer); exactly one of them;
//   - seq: optional per-device sequence number (unsigned integer), for
//     de-duplication;
//   - channel: optional device channel;
//   - tenant, patient, device, message_id: optional overrides of the
//     top-level defaults.
//
// A null field counts as absent. Unknown fields are errors. Identifiers must
// be valid UTF-8 without control characters or surrounding spaces, at most
// 64 (tenant, which may not contain '/'), 128 (patient, device, message_id)
// or 64 (channel) bytes. The body is bounded by http.max_body_bytes. Other
// checks (range, event-time skew and age) are those of package validate.
//
// Accepted samples are grouped into one SampleBatch per (tenant, patient,
// device, message_id), in order of first appearance; each batch is one
// record keyed "<tenant>/<patient>", with source SOURCE_HTTP.
//
// # Answers
//
//   - 200 {"accepted": N}: every sample is in Kafka.
//
//   - 400 application/problem+json, type urn:vigil:problem:invalid-samples:
//     partial acceptance. The valid samples of the batch ARE accepted and in
//     Kafka (the sender must not send them again); each refused sample is on
//     the dead-letter topic, one record each (reason, field such as
//     "samples[3].value", message, raw = that sample's JSON text, and the
//     decoded sample in DeadLetter.batch when it decoded). The body says
//     which:
//
//     {"type": "urn:vigil:problem:invalid-samples", "title": "Some samples were refused",
//     "status": 400, "detail": "...", "message_id": "...", "accepted": 2, "rejected": 1,
//     "errors": [{"index": 1, "field": "samples[1].value", "reason": "out_of_range",
//     "message": "value 900 /min is outside the physiological range [0, 350] of heart_rate"}]}
//
//     errors lists at most MaxProblemErrors entries (errors_truncated is then
//     true); rejected always counts all. A top-level identifier that is
//     wrong is named at the top level ("tenant") for each sample inheriting
//     it.
//
//   - 400 problem (invalid-json, unknown-field, invalid-type, missing-field,
//     invalid-id): the body as a whole is refused (syntax error, unknown or
//     mistyped top-level field, no samples, bad message_id); nothing is
//     accepted; the body (bounded by ingest.deadletter_raw_limit) is one dead
//     letter. The problem names the reason, the field, and for JSON errors
//     the byte offset, line and column. A syntax error anywhere refuses the
//     whole body, since nothing after it can be trusted; an unknown or
//     mistyped field inside a sample refuses only that sample (reason
//     unknown_field or invalid_type).
//
//   - 413 problem (body-too-large, too-many-samples): over
//     http.max_body_bytes or ingest.max_batch_samples; nothing accepted;
//     dead-lettered with the prefix that was read.
//
//   - 415 problem: Content-Type is not application/json, or the body is
//     compressed (Content-Encoding). 405 problem: not POST. Not
//     dead-lettered (no data was read).
//
//   - 429 problem (rate-limited) with Retry-After (whole seconds): the
//     sender is over ingest.rate_limit (a token bucket per top-level
//     tenant+device, else per client address); nothing of the request was
//     accepted or dead-lettered: send it again after Retry-After. Counted in
//     vigil_ingest_rate_limited_total{source="http"}.
//
//   - 503 problem with Retry-After: Kafka did not acknowledge in time
//     (kafka.produce_timeout) or is unavailable; nothing counts as accepted:
//     retry the whole request. Consumers de-duplicate what an earlier
//     attempt may have written. 500 problem: Kafka refused the records
//     permanently.
//
// Dead letters are acknowledged by Kafka before any 4xx answer is sent.
//
// A code without an entry in the mapping tables (a LOINC code, a unit) is
// refused with reason unmapped_code: the code is in the message and on the
// dead letter (DeadLetter.batch, source_code "LOINC:<code>" or the unit as
// sent), and counted in vigil_ingest_unmapped_codes_total{source,system,
// code}, so an integrator sees what to add to the tables.
//
// # Duplicates
//
// A sample with a seq (not 0) whose (tenant, device, seq) was already
// published within ingest.dedupe_window, or that appears twice in one
// request, is answered as accepted but not published again (counted in
// vigil_ingest_duplicates_total{source}); a sender retrying after a lost
// answer thus creates no duplicates. Sequences are remembered only once
// Kafka acknowledged them, so a request that failed (503) is not
// suppressed when retried.
//
// # Other transports
//
// Handler.Accept is the same processing without HTTP: it takes a body and a
// Meta (source, origin, the tenant and device a transport such as MQTT
// derives from its topic) and returns an Outcome (accepted and rejected
// counts, the problem, the message id, and a Kafka error classified
// retriable or permanent). NewCore builds a Handler for that use only.
package httpjson

// ProblemTypeBase prefixes the type URI of every problem body; the suffix
// is the reason in kebab case (e.g. "invalid-json") or one of
// invalid-samples, method-not-allowed, unsupported-media-type, unavailable,
// publish-failed.
const ProblemTypeBase = "urn:vigil:problem:"

// Request is the body of POST /v1/samples, for Go clients (the simulator).
// The handler does not decode through it; see the package documentation for
// the rules.
type Request struct {
	Tenant    string   `json:"tenant,omitempty"`
	Patient   string   `json:"patient,omitempty"`
	Device    string   `json:"device,omitempty"`
	MessageID string   `json:"message_id,omitempty"`
	Samples   []Sample `json:"samples"`
}

// Sample is one element of Request.Samples. Set Metric or LOINC, and Time or
// TimeMs.
type Sample struct {
	Tenant    string  `json:"tenant,omitempty"`
	Patient   string  `json:"patient,omitempty"`
	Device    string  `json:"device,omitempty"`
	MessageID string  `json:"message_id,omitempty"`
	Metric    string  `json:"metric,omitempty"`
	LOINC     string  `json:"loinc,omitempty"`
	Value     float64 `json:"value"`
	Unit      string  `json:"unit,omitempty"`
	Time      string  `json:"time,omitempty"`
	TimeMs    int64   `json:"time_ms,omitempty"`
	Seq       uint64  `json:"seq,omitempty"`
	Channel   string  `json:"channel,omitempty"`
}

// Accepted is the 200 answer.
type Accepted struct {
	Accepted int `json:"accepted"`
}

// Problem is an RFC 7807 problem body (application/problem+json), with the
// extension members of this API.
type Problem struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail,omitempty"`
	// MessageID is the request's message id, when it got that far.
	MessageID string `json:"message_id,omitempty"`
	// Reason and Field name why a whole request was refused.
	Reason string `json:"reason,omitempty"`
	Field  string `json:"field,omitempty"`
	// Offset (bytes from the start of the body), Line and Column (1-based)
	// locate a JSON error.
	Offset *int64 `json:"offset,omitempty"`
	Line   int    `json:"line,omitempty"`
	Column int    `json:"column,omitempty"`
	// Accepted samples are in Kafka; Rejected ones are on the dead-letter
	// topic.
	Accepted        int            `json:"accepted"`
	Rejected        int            `json:"rejected"`
	Errors          []ProblemError `json:"errors,omitempty"`
	ErrorsTruncated bool           `json:"errors_truncated,omitempty"`
}

// ProblemError is one refused sample.
type ProblemError struct {
	// Index is the sample's position in the samples array.
	Index int `json:"index"`
	// Field is the JSON path of the offending field, e.g. "samples[3].value".
	Field string `json:"field"`
	// Reason is machine-readable (see validate.Reasons).
	Reason  string `json:"reason"`
	Message string `json:"message"`
}
