package httpjson

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"

	"github.com/go-json-experiment/json/jsontext"

	"github.com/vigilhealth/vigil/ingest/dedupe"
	"github.com/vigilhealth/vigil/ingest/validate"
)

// The decoder is hand-written over the jsontext tokenizer (the Go team's
// encoding/json/v2 syntax layer) rather than encoding/json struct decoding,
// because this path needs what struct decoding does not give: each sample's
// exact raw bytes (for its dead letter), per-sample errors that do not abort
// the rest of the body (unknown field in samples[3] refuses that sample
// only), error paths and byte offsets, and no allocation per sample for
// strings that alias the body. The tokenizer does the JSON grammar, UTF-8
// validation and duplicate-name detection.

// str is a JSON string field: its unescaped bytes (aliasing the body unless
// it had escapes) and whether it was present (null counts as absent).
type str struct {
	b  []byte
	ok bool
}

// sampleIn is one decoded element of "samples".
type sampleIn struct {
	// raw is the element's JSON text, aliasing the body.
	raw                                []byte
	tenant, patient, device, messageID str
	metric, loinc, unit, channel       str
	value                              float64
	hasValue                           bool
	timeMs                             int64
	hasTime                            bool
	timeField                          string // "time" or "time_ms" when hasTime
	seq                                uint64
	refusal                            *validate.Refusal // decode-level refusal, field already a full path
	refusalIsDecode                    bool
}

// body is a decoded request body.
type body struct {
	tenant, patient, device, messageID str
	samples                            []sampleIn
}

// bodyError refuses a whole request.
type bodyError struct {
	status  int
	reason  validate.Reason
	field   string
	message string
	// offset is the byte offset of the problem, -1 when not applicable;
	// line and column (1-based) are derived from it.
	offset       int64
	line, column int
}

func (e *bodyError) Error() string {
	if e.offset >= 0 {
		return fmt.Sprintf("%s at line %d, column %d (byte %d) (%s)", e.message, e.line, e.column, e.offset, e.reason)
	}
	return fmt.Sprintf("%s (%s)", e.message, e.reason)
}

// decoder decodes request bodies; it is reused (one at a time) through a
// pool owned by the Handler.
type decoder struct {
	dec jsontext.Decoder
	rd  bytes.Buffer
	b   body
	// keys, found and local are the duplicate filter's refs of the
	// request's samples, whether the filter had them, and the sequence
	// numbers seen so far in the request (limits.go); reused from request
	// to request, bounded by ingest.max_batch_samples.
	keys  []dedupe.Ref
	found []bool
	local map[dedupe.Key]uint64
}

const (
	statusBadRequest = 400
	statusTooLarge   = 413
)

// release drops the decoder's references into the last body, so that a
// pooled decoder does not keep a request body alive.
func (d *decoder) release() {
	clear(d.b.samples)
	d.b = body{samples: d.b.samples[:0]}
	d.rd = bytes.Buffer{}
	d.dec.Reset(&d.rd)
}

// decode parses data (the whole request body) into d.b. The result aliases
// data and d, valid until the next decode. At most maxSamples samples are
// accepted; more refuse the whole body.
func (d *decoder) decode(data []byte, maxSamples int) (*body, *bodyError) {
	d.b.samples = d.b.samples[:0]
	d.b.tenant, d.b.patient, d.b.device, d.b.messageID = str{}, str{}, str{}, str{}
	// A bytes.Buffer lets the tokenizer parse data in place, without
	// copying it.
	d.rd = *bytes.NewBuffer(data)
	d.dec.Reset(&d.rd)
	dec := &d.dec

	fail := func(reason validate.Reason, field string, offset int64, format string, args ...any) *bodyError {
		e := &bodyError{status: statusBadRequest, reason: reason, field: field, message: fmt.Sprintf(format, args...), offset: offset}
		e.line, e.column = position(data, offset)
		return e
	}
	syntax := func(err error) *bodyError {
		var se *jsontext.SyntacticError
		off := dec.InputOffset()
		msg := err.Error()
		if errors.As(err, &se) {
			off = se.ByteOffset
			if se.Err != nil {
				msg = se.Err.Error()
			}
			if errors.Is(err, io.ErrUnexpectedEOF) {
				msg = "unexpected end of input"
			}
			if se.JSONPointer != "" {
				msg += " within " + string(se.JSONPointer)
			}
		} else if errors.Is(err, io.EOF) {
			msg = "empty body"
		}
		return fail(validate.InvalidJSON, "", off, "invalid JSON: %s", msg)
	}

	tok, err := dec.ReadToken()
	if err != nil {
		return nil, syntax(err)
	}
	if tok.Kind() != '{' {
		return nil, fail(validate.InvalidJSON, "", 0, "the body must be a JSON object, not %s", KindName(tok.Kind()))
	}
	sawSamples := false
	for dec.PeekKind() != '}' {
		nameOff := valueStart(data, dec.InputOffset())
		nv, err := dec.ReadValue()
		if err != nil {
			return nil, syntax(err)
		}
		name := unquote(nv)
		valOff := valueStart(data, dec.InputOffset())
		switch string(name) {
		case "tenant", "patient", "device", "message_id":
			v, err := dec.ReadValue()
			if err != nil {
				return nil, syntax(err)
			}
			s, ok := stringValue(v)
			if !ok {
				return nil, fail(validate.InvalidType, string(name), valOff, "%s must be a string, not %s", name, KindName(v.Kind()))
			}
			switch string(name) {
			case "tenant":
				d.b.tenant = s
			case "patient":
				d.b.patient = s
			case "device":
				d.b.device = s
			default:
				d.b.messageID = s
			}
		case "samples":
			sawSamples = true
			switch dec.PeekKind() {
			case '[':
			case 'n':
				if _, err := dec.ReadValue(); err != nil {
					return nil, syntax(err)
				}
				continue
			default:
				v, err := dec.ReadValue()
				if err != nil {
					return nil, syntax(err)
				}
				return nil, fail(validate.InvalidType, "samples", valOff, "samples must be an array, not %s", KindName(v.Kind()))
			}
			if _, err := dec.ReadToken(); err != nil {
				return nil, syntax(err)
			}
			for {
				k := dec.PeekKind()
				if k == ']' {
					break
				}
				if k == 0 { // a syntax error between elements
					_, err := dec.ReadToken()
					return nil, syntax(err)
				}
				if len(d.b.samples) == maxSamples {
					e := fail(validate.TooManySamples, "samples", valueStart(data, dec.InputOffset()), "more than %d samples in one request; split it", maxSamples)
					e.status = statusTooLarge
					return nil, e
				}
				if e := d.sample(data); e != nil {
					return nil, e
				}
			}
			if _, err := dec.ReadToken(); err != nil {
				return nil, syntax(err)
			}
		default:
			return nil, fail(validate.UnknownField, fieldName(name), nameOff, "unknown field %q (known: tenant, patient, device, message_id, samples)", clip(name))
		}
	}
	if _, err := dec.ReadToken(); err != nil {
		return nil, syntax(err)
	}
	if _, err := dec.ReadToken(); err != io.EOF {
		if err == nil {
			return nil, fail(validate.InvalidJSON, "", dec.InputOffset(), "invalid JSON: data after the top-level object")
		}
		return nil, syntax(err)
	}
	if !sawSamples || len(d.b.samples) == 0 {
		return nil, fail(validate.MissingField, "samples", -1, "no samples: the body needs a non-empty \"samples\" array")
	}
	return &d.b, nil
}

// sample decodes one element of the samples array into a new entry of
// d.b.samples. Only syntax errors refuse the whole body; anything else is
// recorded on the sample.
func (d *decoder) sample(data []byte) *bodyError {
	dec := &d.dec
	idx := len(d.b.samples)
	d.b.samples = append(d.b.samples, sampleIn{})
	s := &d.b.samples[idx]
	start := dec.InputOffset()
	refuse := func(reason validate.Reason, field, format string, args ...any) {
		if s.refusal == nil {
			s.refusal = validate.Refuse(reason, fmt.Sprintf("samples[%d]%s", idx, field), format, args...)
			s.refusalIsDecode = true
		}
	}
	syntax := func(err error) *bodyError {
		var se *jsontext.SyntacticError
		off := dec.InputOffset()
		msg := err.Error()
		if errors.As(err, &se) {
			off = se.ByteOffset
			if se.Err != nil {
				msg = se.Err.Error()
			}
			if errors.Is(err, io.ErrUnexpectedEOF) {
				msg = "unexpected end of input"
			}
		}
		e := &bodyError{status: statusBadRequest, reason: validate.InvalidJSON, field: fmt.Sprintf("samples[%d]", idx),
			message: "invalid JSON in samples[" + strconv.Itoa(idx) + "]: " + msg, offset: off}
		e.line, e.column = position(data, off)
		return e
	}
	if dec.PeekKind() != '{' {
		v, err := dec.ReadValue()
		if err != nil {
			return syntax(err)
		}
		s.raw = v
		refuse(validate.InvalidType, "", "a sample must be a JSON object, not %s", KindName(v.Kind()))
		return nil
	}
	if _, err := dec.ReadToken(); err != nil {
		return syntax(err)
	}
	for dec.PeekKind() != '}' {
		nv, err := dec.ReadValue()
		if err != nil {
			return syntax(err)
		}
		name := unquote(nv)
		v, err := dec.ReadValue()
		if err != nil {
			return syntax(err)
		}
		var target *str
		switch string(name) {
		case "tenant":
			target = &s.tenant
		case "patient":
			target = &s.patient
		case "device":
			target = &s.device
		case "message_id":
			target = &s.messageID
		case "metric":
			target = &s.metric
		case "loinc":
			target = &s.loinc
		case "unit":
			target = &s.unit
		case "channel":
			target = &s.channel
		case "value":
			switch v.Kind() {
			case 'n':
			case '0':
				f, err := strconv.ParseFloat(string(v), 64)
				if err != nil || math.IsInf(f, 0) {
					refuse(validate.NotFinite, ".value", "value %s does not fit a 64-bit float", clip(v))
				}
				s.value, s.hasValue = f, true
			default:
				refuse(validate.InvalidType, ".value", "value must be a number, not %s", KindName(v.Kind()))
			}
			continue
		case "time":
			switch v.Kind() {
			case 'n':
			case '"':
				ts, _ := stringValue(v)
				ms, ok := parseRFC3339Ms(ts.b)
				if !ok {
					refuse(validate.InvalidTime, ".time", "time %s is not an RFC 3339 timestamp (e.g. 2026-11-23T10:00:00.250Z)", clip(v))
				} else if s.hasTime {
					refuse(validate.InvalidTime, ".time", "give time or time_ms, not both")
				}
				s.timeMs, s.hasTime, s.timeField = ms, true, "time"
			default:
				refuse(validate.InvalidType, ".time", "time must be an RFC 3339 string, not %s", KindName(v.Kind()))
			}
			continue
		case "time_ms":
			switch v.Kind() {
			case 'n':
			case '0':
				ms, ok := parseInt(v)
				if !ok {
					refuse(validate.InvalidType, ".time_ms", "time_ms %s is not an integer number of milliseconds", clip(v))
				} else if s.hasTime {
					refuse(validate.InvalidTime, ".time_ms", "give time or time_ms, not both")
				}
				s.timeMs, s.hasTime, s.timeField = ms, true, "time_ms"
			default:
				refuse(validate.InvalidType, ".time_ms", "time_ms must be a number, not %s", KindName(v.Kind()))
			}
			continue
		case "seq":
			switch v.Kind() {
			case 'n':
			case '0':
				n, ok := parseUint(v)
				if !ok {
					refuse(validate.InvalidType, ".seq", "seq %s is not an unsigned 64-bit integer", clip(v))
				}
				s.seq = n
			default:
				refuse(validate.InvalidType, ".seq", "seq must be a number, not %s", KindName(v.Kind()))
			}
			continue
		default:
			refuse(validate.UnknownField, "."+fieldName(name), "unknown field %q (known: metric, loinc, value, unit, time, time_ms, seq, channel, tenant, patient, device, message_id)", clip(name))
			continue
		}
		str, ok := stringValue(v)
		if !ok {
			refuse(validate.InvalidType, "."+string(name), "%s must be a string, not %s", name, KindName(v.Kind()))
			continue
		}
		*target = str
	}
	if _, err := dec.ReadToken(); err != nil {
		return syntax(err)
	}
	s.raw = bytes.TrimLeft(data[start:dec.InputOffset()], " \t\r\n,")
	return nil
}

// stringValue returns the unescaped content of a JSON string value; null is
// absent; other kinds are not strings.
func stringValue(v jsontext.Value) (str, bool) {
	switch v.Kind() {
	case 'n':
		return str{}, true
	case '"':
		return str{b: unquote(v), ok: true}, true
	}
	return str{}, false
}

// unquote returns the content of a valid quoted JSON string, aliasing it
// unless it has escapes.
func unquote(v []byte) []byte {
	inner := v[1 : len(v)-1]
	if bytes.IndexByte(inner, '\\') < 0 {
		return inner
	}
	out, err := jsontext.AppendUnquote(nil, v)
	if err != nil {
		// The tokenizer validated v; this cannot happen.
		return inner
	}
	return out
}

// parseInt parses a JSON number that must be an integer (no fraction or
// exponent) fitting int64.
func parseInt(v []byte) (int64, bool) {
	neg := len(v) > 0 && v[0] == '-'
	u, ok := parseUint(v[btoi(neg):])
	if !ok || u > math.MaxInt64 {
		return 0, false
	}
	if neg {
		return -int64(u), true
	}
	return int64(u), true
}

// parseUint parses a JSON number that must be a non-negative integer fitting
// uint64.
func parseUint(v []byte) (uint64, bool) {
	if len(v) == 0 || len(v) > 20 {
		return 0, false
	}
	var n uint64
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		d := uint64(c - '0')
		if n > (math.MaxUint64-d)/10 {
			return 0, false
		}
		n = n*10 + d
	}
	return n, true
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// valueStart skips the whitespace and delimiter between off (the end of the
// previous token) and the start of the next value.
func valueStart(data []byte, off int64) int64 {
	for off < int64(len(data)) {
		switch data[off] {
		case ' ', '\t', '\r', '\n', ',', ':':
			off++
			continue
		}
		break
	}
	return off
}

// position converts a byte offset into a 1-based line and column (in bytes).
func position(data []byte, off int64) (line, col int) {
	if off < 0 {
		return 0, 0
	}
	if off > int64(len(data)) {
		off = int64(len(data))
	}
	before := data[:off]
	line = 1 + bytes.Count(before, []byte{'\n'})
	col = int(off) - (bytes.LastIndexByte(before, '\n') + 1) + 1
	return line, col
}

// KindName names a JSON token kind for error messages ("a string", "an
// object"...); the other JSON decoders of ingest use it too.
func KindName(k jsontext.Kind) string {
	switch k {
	case 'n':
		return "null"
	case 'f', 't':
		return "a boolean"
	case '"':
		return "a string"
	case '0':
		return "a number"
	case '{':
		return "an object"
	case '[':
		return "an array"
	}
	return "nothing"
}

// fieldName renders an unknown field name for a path, bounded.
func fieldName(name []byte) string {
	if len(name) > 64 {
		return string(name[:64]) + "…"
	}
	return string(name)
}

func clip(b []byte) string {
	if len(b) > 64 {
		return string(b[:64]) + "…"
	}
	return string(b)
}
