package waveform

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"time"

	"github.com/go-json-experiment/json/jsontext"

	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/ingest/validate"
)

// Request is the body of POST /v1/waveforms (schema v1):
//
//	{"tenant": "st-mary", "patient": "p-001", "device": "bed-7",
//	 "channel": "MLII", "metric": "ecg", "unit": "mV", "rate_hz": 360,
//	 "start": "2026-11-23T10:00:00Z",   // or "start_ms": 1795428000000
//	 "message_id": "gw-42-17",          // optional
//	 "values": [-0.145, -0.145, ...]}
//
// tenant, patient, device, rate_hz, values and one of start / start_ms are
// required; channel defaults to "", metric to "ecg", unit to "mV". A null
// member counts as absent; unknown or duplicate members are errors.
type Request struct {
	Tenant    string    `json:"tenant"`
	Patient   string    `json:"patient"`
	Device    string    `json:"device"`
	Channel   string    `json:"channel,omitempty"`
	Metric    string    `json:"metric,omitempty"`
	Unit      string    `json:"unit,omitempty"`
	RateHz    float64   `json:"rate_hz"`
	Start     string    `json:"start,omitempty"`
	StartMs   int64     `json:"start_ms,omitempty"`
	MessageID string    `json:"message_id,omitempty"`
	Values    []float64 `json:"values"`
}

// DecodeError is a body refused as a whole. Offset is the byte offset of a
// JSON error, -1 when the error is not tied to a place.
type DecodeError struct {
	Reason  validate.Reason
	Field   string
	Message string
	Offset  int64
}

// Error returns the field and message.
func (e *DecodeError) Error() string {
	if e.Field == "" {
		return e.Message
	}
	return e.Field + ": " + e.Message
}

// Decode parses a request body. It reads at most maxValues values (more is
// a too_many_samples error) and returns the request with the start as Unix
// ms in StartMs. It does not keep data. Hand-written over jsontext (rather
// than json.Unmarshal) so that a null or a string inside values, a number
// where a string belongs, and a fractional start_ms are refused with the
// field named, and so that a huge values array stops at maxValues.
func Decode(data []byte, maxValues int) (*Request, *DecodeError) {
	d := jsontext.NewDecoder(bytes.NewReader(data))
	fail := func(reason validate.Reason, field string, off int64, format string, args ...any) (*Request, *DecodeError) {
		return nil, &DecodeError{Reason: reason, Field: field, Message: fmt.Sprintf(format, args...), Offset: off}
	}
	syntax := func(field string, err error) (*Request, *DecodeError) {
		var se *jsontext.SyntacticError
		off := d.InputOffset()
		if errors.As(err, &se) {
			off = se.ByteOffset
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fail(validate.InvalidJSON, field, off, "the body ends early")
		}
		return fail(validate.InvalidJSON, field, off, "%v", err)
	}
	tok, err := d.ReadToken()
	if err != nil {
		return syntax("", err)
	}
	if tok.Kind() != '{' {
		return fail(validate.InvalidJSON, "", 0, "the body must be a JSON object")
	}
	var r Request
	var seen struct{ tenant, patient, device, rate, start, startMs, values bool }
	str := func(name string, dst *string) (*DecodeError, bool) {
		off := d.InputOffset()
		tok, err := d.ReadToken()
		if err != nil {
			_, e := syntax(name, err)
			return e, false
		}
		switch tok.Kind() {
		case 'n':
			return nil, false
		case '"':
			*dst = tok.String()
			return nil, true
		}
		return &DecodeError{Reason: validate.InvalidType, Field: name, Offset: off,
			Message: fmt.Sprintf("want a string, got %s", httpjson.KindName(tok.Kind()))}, false
	}
	for {
		off := d.InputOffset()
		tok, err := d.ReadToken()
		if err != nil {
			return syntax("", err)
		}
		if tok.Kind() == '}' {
			break
		}
		name := tok.String()
		var e *DecodeError
		var ok bool
		switch name {
		case "tenant":
			e, seen.tenant = str(name, &r.Tenant)
		case "patient":
			e, seen.patient = str(name, &r.Patient)
		case "device":
			e, seen.device = str(name, &r.Device)
		case "channel":
			e, _ = str(name, &r.Channel)
		case "metric":
			e, _ = str(name, &r.Metric)
		case "unit":
			e, _ = str(name, &r.Unit)
		case "message_id":
			e, _ = str(name, &r.MessageID)
		case "start":
			var s string
			if e, ok = str(name, &s); ok {
				t, err := time.Parse(time.RFC3339Nano, s)
				if err != nil {
					return fail(validate.InvalidTime, name, off, "%q is not an RFC 3339 time", s)
				}
				r.Start, r.StartMs, seen.start = s, t.UnixMilli(), true
			}
		case "rate_hz", "start_ms":
			voff := d.InputOffset()
			tok, err := d.ReadToken()
			if err != nil {
				return syntax(name, err)
			}
			if tok.Kind() == 'n' {
				continue
			}
			if tok.Kind() != '0' {
				return fail(validate.InvalidType, name, voff, "want a number, got %s", httpjson.KindName(tok.Kind()))
			}
			if name == "rate_hz" {
				v, err := tok.Float()
				if err != nil || math.IsInf(v, 0) {
					return fail(validate.InvalidType, name, voff, "%s is not a finite number", tok.String())
				}
				r.RateHz, seen.rate = v, true
			} else {
				v, err := strconv.ParseInt(tok.String(), 10, 64)
				if err != nil {
					return fail(validate.InvalidType, name, voff, "%s is not an integer (Unix epoch milliseconds)", tok.String())
				}
				r.StartMs, seen.startMs = v, true
			}
		case "values":
			voff := d.InputOffset()
			tok, err := d.ReadToken()
			if err != nil {
				return syntax(name, err)
			}
			if tok.Kind() == 'n' {
				continue
			}
			if tok.Kind() != '[' {
				return fail(validate.InvalidType, name, voff, "want an array of numbers, got %s", httpjson.KindName(tok.Kind()))
			}
			for {
				eoff := d.InputOffset()
				tok, err := d.ReadToken()
				field := "values[" + strconv.Itoa(len(r.Values)) + "]"
				if err != nil {
					return syntax(field, err)
				}
				if tok.Kind() == ']' {
					break
				}
				if tok.Kind() != '0' {
					return fail(validate.InvalidType, field, eoff, "want a number, got %s", httpjson.KindName(tok.Kind()))
				}
				if len(r.Values) == maxValues {
					return fail(validate.TooManySamples, name, eoff, "more than %d values: split the waveform into chunks", maxValues)
				}
				v, err := tok.Float()
				if err != nil || math.IsInf(v, 0) {
					return fail(validate.NotFinite, field, eoff, "%s is not a finite number", tok.String())
				}
				r.Values = append(r.Values, v)
			}
			seen.values = true
		default:
			return fail(validate.UnknownField, name, off, "unknown member %q", name)
		}
		if e != nil {
			return nil, e
		}
	}
	if _, err := d.ReadToken(); !errors.Is(err, io.EOF) {
		return fail(validate.InvalidJSON, "", d.InputOffset(), "data after the JSON object")
	}
	for _, m := range []struct {
		ok   bool
		name string
	}{{seen.tenant, "tenant"}, {seen.patient, "patient"}, {seen.device, "device"}, {seen.rate, "rate_hz"}, {seen.values, "values"}} {
		if !m.ok {
			return fail(validate.MissingField, m.name, -1, "required")
		}
	}
	switch {
	case seen.start && seen.startMs:
		return fail(validate.InvalidTime, "start_ms", -1, "give start or start_ms, not both")
	case !seen.start && !seen.startMs:
		return fail(validate.MissingField, "start", -1, "required (RFC 3339), or start_ms (Unix epoch milliseconds)")
	}
	if r.Metric == "" {
		r.Metric = "ecg"
	}
	if r.Unit == "" {
		r.Unit = "mV"
	}
	return &r, nil
}
