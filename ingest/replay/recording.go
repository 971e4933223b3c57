package replay

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/klauspost/compress/gzip"

	"github.com/vigilhealth/vigil/ingest/validate"
)

// MaxRecordingLine bounds one line of a recording (one request body); it
// matches the default http.max_body_bytes.
const MaxRecordingLine = 8 << 20

// IsRecording reports whether name is a recording by its extension:
// .jsonl, .ndjson, optionally followed by .gz.
func IsRecording(name string) bool {
	name = strings.TrimSuffix(name, ".gz")
	return strings.HasSuffix(name, ".jsonl") || strings.HasSuffix(name, ".ndjson")
}

// Recording is a recording file being written: JSON Lines, gzip-compressed
// when its name ends in .gz. Write takes one request body (without a line
// end); Close flushes and closes the file. Not safe for concurrent use.
type Recording struct {
	f  *os.File
	gz *gzip.Writer
	bw *bufio.Writer
}

// CreateRecording creates (truncating) the recording file at path.
func CreateRecording(path string) (*Recording, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("creating recording: %w", err)
	}
	r := &Recording{f: f}
	var w io.Writer = f
	if strings.HasSuffix(path, ".gz") {
		r.gz = gzip.NewWriter(f)
		w = r.gz
	}
	r.bw = bufio.NewWriterSize(w, 64<<10)
	return r, nil
}

// Write appends body as one line. A body containing a raw line end would
// break the format; JSON from encoding/json never does, and Write refuses it.
func (r *Recording) Write(body []byte) (int, error) {
	body = bytes.TrimRight(body, "\n")
	if bytes.IndexByte(body, '\n') >= 0 {
		return 0, errors.New("writing recording: body contains a line end")
	}
	if _, err := r.bw.Write(body); err != nil {
		return 0, fmt.Errorf("writing recording: %w", err)
	}
	if err := r.bw.WriteByte('\n'); err != nil {
		return 0, fmt.Errorf("writing recording: %w", err)
	}
	return len(body), nil
}

// Close flushes and closes the file; it is idempotent.
func (r *Recording) Close() error {
	if r.f == nil {
		return nil
	}
	err := r.bw.Flush()
	if r.gz != nil {
		err = errors.Join(err, r.gz.Close())
	}
	err = errors.Join(err, r.f.Close())
	r.f = nil
	if err != nil {
		return fmt.Errorf("closing recording: %w", err)
	}
	return nil
}

// recBody is a request body as encoding/json decodes it; pointers tell
// absent (or null) from zero, as the HTTP API does.
type recBody struct {
	Tenant    *string           `json:"tenant"`
	Patient   *string           `json:"patient"`
	Device    *string           `json:"device"`
	MessageID *string           `json:"message_id"`
	Samples   []json.RawMessage `json:"samples"`
}

type recSample struct {
	Tenant    *string  `json:"tenant"`
	Patient   *string  `json:"patient"`
	Device    *string  `json:"device"`
	MessageID *string  `json:"message_id"`
	Metric    *string  `json:"metric"`
	LOINC     *string  `json:"loinc"`
	Value     *float64 `json:"value"`
	Unit      *string  `json:"unit"`
	Time      *string  `json:"time"`
	TimeMs    *int64   `json:"time_ms"`
	Seq       *uint64  `json:"seq"`
	Channel   *string  `json:"channel"`
}

func deref(s *string, def string) string {
	if s == nil {
		return def
	}
	return *s
}

// decodeBody turns one recorded request body into items, following the
// rules of POST /v1/samples (top-level defaults, per-sample overrides,
// unknown fields refuse the sample). It uses encoding/json rather than
// the HTTP handler's token decoder, which is internal to ingest/httpjson;
// a body it refuses as a whole returns a Refusal (reason invalid_json,
// unknown_field, invalid_type or missing_field). defMsgID is the message id
// of samples that carry none.
func decodeBody(line []byte, defMsgID string, dst []item) ([]item, *validate.Refusal) {
	var b recBody
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		var ute *json.UnmarshalTypeError
		switch {
		case errors.As(err, &ute):
			return dst, validate.Refuse(validate.InvalidType, ute.Field, "%s must not be a JSON %s", ute.Field, ute.Value)
		case strings.HasPrefix(err.Error(), "json: unknown field"):
			return dst, validate.Refuse(validate.UnknownField, "", "%s", err.Error())
		}
		return dst, validate.Refuse(validate.InvalidJSON, "", "invalid JSON: %v", err)
	}
	if dec.More() {
		return dst, validate.Refuse(validate.InvalidJSON, "", "invalid JSON: data after the top-level object")
	}
	if len(b.Samples) == 0 {
		return dst, validate.Refuse(validate.MissingField, "samples", "no samples: the body needs a non-empty \"samples\" array")
	}
	msgID := deref(b.MessageID, defMsgID)
	for i, raw := range b.Samples {
		var s recSample
		it := item{raw: raw}
		sd := json.NewDecoder(bytes.NewReader(raw))
		sd.DisallowUnknownFields()
		if err := sd.Decode(&s); err != nil {
			reason := validate.InvalidType
			if strings.HasPrefix(err.Error(), "json: unknown field") {
				reason = validate.UnknownField
			}
			it.in = validate.Input{Tenant: deref(b.Tenant, ""), Patient: deref(b.Patient, ""), Device: deref(b.Device, "")}
			it.msgID = msgID
			it.refusal = validate.Refuse(reason, fmt.Sprintf("samples[%d]", i), "%v", err)
			dst = append(dst, it)
			continue
		}
		it.msgID = deref(s.MessageID, msgID)
		it.in = validate.Input{
			Tenant: deref(s.Tenant, deref(b.Tenant, "")), Patient: deref(s.Patient, deref(b.Patient, "")),
			Device: deref(s.Device, deref(b.Device, "")), Metric: deref(s.Metric, ""), LOINC: deref(s.LOINC, ""),
			Unit: deref(s.Unit, ""), Channel: deref(s.Channel, ""),
		}
		if s.Value != nil {
			it.in.Value, it.in.HasValue = *s.Value, true
		}
		if s.Seq != nil {
			it.in.Sequence = *s.Seq
		}
		switch {
		case s.Time != nil && s.TimeMs != nil:
			it.refusal = validate.Refuse(validate.InvalidTime, fmt.Sprintf("samples[%d].time", i), "give time or time_ms, not both")
		case s.TimeMs != nil:
			it.in.EventTimeMs, it.in.HasTime = *s.TimeMs, true
		case s.Time != nil:
			t, err := time.Parse(time.RFC3339Nano, *s.Time)
			if err != nil {
				it.refusal = validate.Refuse(validate.InvalidTime, fmt.Sprintf("samples[%d].time", i),
					"time %q is not an RFC 3339 timestamp", *s.Time)
			}
			it.in.EventTimeMs, it.in.HasTime = t.UnixMilli(), true
		}
		dst = append(dst, it)
	}
	return dst, nil
}
