package httpjson

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/mapping"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Path is where the handler is meant to be mounted (POST).
const Path = "/v1/samples"

// MaxMessageIDLen bounds message_id, in bytes.
const MaxMessageIDLen = 128

// MaxProblemErrors bounds the errors listed in one problem body; the
// rejected count is always complete.
const MaxProblemErrors = 1000

// Publisher is what the handler needs from publish.Publisher: both calls
// block until Kafka acknowledged every record and classify their errors with
// publish.IsRetriable.
type Publisher interface {
	Publish(ctx context.Context, batches []*vigilv1.SampleBatch) error
	DeadLetter(ctx context.Context, letters []*vigilv1.DeadLetter) error
}

// Handler serves POST /v1/samples (see the package documentation for the
// schema and the answers). It is safe for concurrent use; each request is
// answered only after Kafka acknowledged what it accepted and refused.
type Handler struct {
	pub        Publisher
	val        *validate.Validator
	log        *slog.Logger
	clock      clock.Clock
	maxBody    int64
	maxSamples int
	// names interns the catalogue's strings (ids, LOINC codes, units) so
	// that a sample's metric and unit need no allocation.
	names map[string]string
	pool  sync.Pool // *decoder
	// resolver, when set, gives samples without a patient the patient
	// bound to their device (see SetResolver).
	resolver Resolver
	// limits are the rate limit and duplicate filter (limits.go); nil
	// when not enabled (NewCore without UseLimits).
	limits    *limits
	rateLimit config.RateLimit
	// codes, when set, maps LOINC codes and units (see SetCodes).
	codes Codes

	requests *prometheus.CounterVec
	received prometheus.Counter
	duration prometheus.Histogram
}

// New creates the handler for cfg (http.max_body_bytes,
// ingest.max_batch_samples, the validation limits and catalogue of
// cfg.Ingest) publishing through pub, and registers its metrics on
// deps.Metrics.
func New(cfg config.Config, deps stage.Deps, pub Publisher) (*Handler, error) {
	deps = deps.WithDefaults()
	h, err := newHandler(cfg, deps, pub)
	if err != nil {
		return nil, err
	}
	if err := h.registerHTTP(deps.Metrics); err != nil {
		return nil, err
	}
	if err := h.UseLimits(cfg.Ingest, deps, "http"); err != nil {
		return nil, err
	}
	return h, nil
}

func newHandler(cfg config.Config, deps stage.Deps, pub Publisher) (*Handler, error) {
	if pub == nil {
		return nil, errors.New("creating http ingest: no publisher")
	}
	cat, err := catalog.Load(cfg.Ingest.Catalog)
	if err != nil {
		return nil, err
	}
	h := &Handler{
		pub:        pub,
		val:        validate.New(cat, validate.LimitsFrom(cfg.Ingest)),
		log:        deps.Log,
		clock:      deps.Clock,
		maxBody:    cfg.HTTP.MaxBodyBytes,
		maxSamples: cfg.Ingest.MaxBatchSamples,
		names:      map[string]string{},
	}
	h.pool.New = func() any { return new(decoder) }
	for _, id := range cat.IDs() {
		m, _ := cat.Lookup(id)
		h.names[m.ID] = m.ID
		h.names[m.LOINC] = m.LOINC
		h.names[m.Unit] = m.Unit
		for _, u := range m.Units {
			h.names[u.UCUM] = u.UCUM
		}
	}
	h.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_ingest_http_requests_total",
		Help: "POST /v1/samples requests answered, by HTTP status code.",
	}, []string{"code"})
	h.received = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "vigil_ingest_http_samples_received_total",
		Help: "Samples decoded from POST /v1/samples bodies (accepted or refused).",
	})
	h.duration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "vigil_ingest_http_request_seconds",
		Help:    "Time to answer POST /v1/samples, including the Kafka acknowledgement.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 12),
	})
	return h, nil
}

// ServeHTTP answers one request; see the package documentation.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	code := h.serve(w, r)
	h.requests.WithLabelValues(strconv.Itoa(code)).Inc()
	h.duration.Observe(time.Since(start).Seconds())
}

func (h *Handler) serve(w http.ResponseWriter, r *http.Request) int {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		return WriteProblem(w, &Problem{Type: problemType("method-not-allowed"), Title: "Method not allowed",
			Status: http.StatusMethodNotAllowed, Detail: fmt.Sprintf("%s %s: use POST", r.Method, r.URL.Path)})
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return WriteProblem(w, &Problem{Type: problemType("unsupported-media-type"), Title: "Unsupported media type",
			Status: http.StatusUnsupportedMediaType,
			Detail: fmt.Sprintf("Content-Type %q: send application/json", r.Header.Get("Content-Type"))})
	}
	if ce := r.Header.Get("Content-Encoding"); ce != "" && !strings.EqualFold(ce, "identity") {
		return WriteProblem(w, &Problem{Type: problemType("unsupported-media-type"), Title: "Unsupported content encoding",
			Status: http.StatusUnsupportedMediaType, Detail: fmt.Sprintf("Content-Encoding %q is not supported: send the body uncompressed", ce)})
	}
	now := h.clock.Now().UnixMilli()
	m := Meta{Source: vigilv1.Source_SOURCE_HTTP, Origin: r.RemoteAddr, ContentType: "application/json"}
	data, tooLarge := h.readBody(w, r)
	var o Outcome
	if tooLarge != nil {
		var rawSize uint64
		if tooLarge.status == http.StatusRequestEntityTooLarge && r.ContentLength > int64(len(data)) {
			rawSize = uint64(r.ContentLength)
		}
		o = h.refuseBody(r.Context(), tooLarge, data, m, rawSize, now)
	} else {
		o = h.accept(r.Context(), data, m, now)
	}
	h.received.Add(float64(o.Samples))
	switch {
	case o.Err != nil:
		return h.publishFailed(w, o.Err, o.MessageID)
	case o.Problem != nil:
		if o.RetryAfter > 0 {
			w.Header().Set("Retry-After", strconv.FormatInt(int64(o.RetryAfter/time.Second), 10))
		}
		return WriteProblem(w, o.Problem)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	out := strconv.AppendInt(append(make([]byte, 0, 32), `{"accepted":`...), int64(o.Accepted), 10)
	_, _ = w.Write(append(out, "}\n"...))
	return http.StatusOK
}

// readBody reads the whole body, bounded by maxBody.
func (h *Handler) readBody(w http.ResponseWriter, r *http.Request) ([]byte, *bodyError) {
	tooLarge := func(n int64) *bodyError {
		return &bodyError{status: http.StatusRequestEntityTooLarge, reason: validate.BodyTooLarge, offset: -1,
			message: fmt.Sprintf("the body is larger than %d bytes (%d read); split it", h.maxBody, n)}
	}
	if r.ContentLength > h.maxBody {
		// Read a prefix for the dead letter; the rest is not read.
		prefix, _ := io.ReadAll(io.LimitReader(r.Body, 4096))
		return prefix, tooLarge(r.ContentLength)
	}
	size := r.ContentLength
	if size < 0 {
		size = 4096
	}
	buf := bytes.NewBuffer(make([]byte, 0, size+1))
	_, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, h.maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return buf.Bytes(), tooLarge(int64(buf.Len()))
		}
		return buf.Bytes(), &bodyError{status: http.StatusBadRequest, reason: validate.InvalidJSON, offset: int64(buf.Len()),
			message: fmt.Sprintf("reading the body failed after %d bytes: %v", buf.Len(), err)}
	}
	return buf.Bytes(), nil
}

// validate turns decoded samples into batches grouped by (tenant, patient,
// device, message id) in order of first appearance, and refusals into dead
// letters and problem entries.
func (h *Handler) validate(b *body, m Meta, msgID string, now int64) ([]*vigilv1.SampleBatch, []*vigilv1.DeadLetter, []ProblemError) {
	var (
		batches  []*vigilv1.SampleBatch
		letters  []*vigilv1.DeadLetter
		problems []ProblemError
		groups   map[string]*vigilv1.SampleBatch
		last     *vigilv1.SampleBatch
		local    map[string]string // interned per-sample strings of this request
		key      []byte
		slab     = make([]vigilv1.Sample, len(b.samples))
	)
	intern := func(s str, def string) string {
		if !s.ok {
			return def
		}
		if v, ok := h.names[string(s.b)]; ok {
			return v
		}
		if v, ok := local[string(s.b)]; ok {
			return v
		}
		if local == nil {
			local = map[string]string{}
		}
		v := string(s.b)
		local[v] = v
		return v
	}
	defTenant, defPatient, defDevice := string(b.tenant.b), string(b.patient.b), string(b.device.b)
	if !b.tenant.ok && m.Tenant != "" {
		defTenant = m.Tenant
	}
	if !b.device.ok && m.Device != "" {
		defDevice = m.Device
	}
	source := m.source()
	var tables *mapping.Tables
	if h.codes != nil {
		// One snapshot for the whole request: a reload mid-request
		// does not map its samples differently.
		tables = h.codes.Tables()
	}
	for i := range b.samples {
		s := &b.samples[i]
		in := validate.Input{
			Tenant:      intern(s.tenant, defTenant),
			Patient:     intern(s.patient, defPatient),
			Device:      intern(s.device, defDevice),
			Metric:      intern(s.metric, ""),
			LOINC:       intern(s.loinc, ""),
			Unit:        intern(s.unit, ""),
			Channel:     intern(s.channel, ""),
			Value:       s.value,
			HasValue:    s.hasValue,
			EventTimeMs: s.timeMs,
			HasTime:     s.hasTime,
			Sequence:    s.seq,
		}
		mid := intern(s.messageID, msgID)
		rf := s.refusal
		if rf == nil && s.messageID.ok {
			if rf = validate.CheckID("message_id", mid, MaxMessageIDLen); rf != nil {
				rf.Field = fmt.Sprintf("samples[%d].message_id", i)
			}
		}
		if rf == nil && m.Tenant != "" && in.Tenant != m.Tenant {
			rf = validate.Refuse(validate.InvalidID, fieldPath(i, validate.FieldTenant, s),
				"tenant %q is not the tenant %q this message was sent for (%s)", in.Tenant, m.Tenant, m.Origin)
		}
		if rf == nil && in.Patient == "" && in.Device != "" && h.resolver != nil {
			rf = h.resolvePatient(&in, i, s, now)
		}
		if rf == nil && tables != nil {
			rf = h.mapCodes(tables, &in, i, s, source)
		}
		out := &slab[i]
		if rf == nil {
			if rf = h.val.Sample(&in, now, out); rf != nil {
				rf.Field = fieldPath(i, rf.Field, s)
			}
		}
		if rf != nil {
			letters = append(letters, h.letter(&m, s, &in, mid, rf, now))
			if len(problems) < MaxProblemErrors {
				problems = append(problems, ProblemError{Index: i, Field: rf.Field, Reason: string(rf.Reason), Message: rf.Message})
			}
			continue
		}
		if last == nil || last.Tenant != in.Tenant || last.Patient != in.Patient || last.Device != in.Device || last.MessageId != mid {
			key = append(append(append(append(append(append(append(key[:0], in.Tenant...), 0), in.Patient...), 0), in.Device...), 0), mid...)
			last = groups[string(key)]
			if last == nil {
				last = &vigilv1.SampleBatch{SchemaVersion: publish.SchemaVersion, Tenant: in.Tenant, Patient: in.Patient,
					Device: in.Device, Source: source, IngestTimeMs: now, MessageId: mid}
				if len(batches) > 0 && groups == nil {
					groups = map[string]*vigilv1.SampleBatch{}
					// The first group was made before the map existed.
					f := batches[0]
					groups[f.Tenant+"\x00"+f.Patient+"\x00"+f.Device+"\x00"+f.MessageId] = f
				}
				if groups != nil {
					groups[string(key)] = last
				}
				batches = append(batches, last)
			}
		}
		last.Samples = append(last.Samples, out)
	}
	return batches, letters, problems
}

// fieldPath maps a validate field name onto the request's JSON path: an
// inherited top-level id is named at the top level.
func fieldPath(i int, field string, s *sampleIn) string {
	switch field {
	case validate.FieldTenant:
		if !s.tenant.ok {
			return "tenant"
		}
	case validate.FieldPatient:
		if !s.patient.ok {
			return "patient"
		}
	case validate.FieldDevice:
		if !s.device.ok {
			return "device"
		}
	case validate.FieldTime:
		if s.hasTime {
			field = s.timeField
		}
	}
	return "samples[" + strconv.Itoa(i) + "]." + field
}

// letter builds the dead letter of refused sample i.
func (h *Handler) letter(m *Meta, s *sampleIn, in *validate.Input, msgID string, rf *validate.Refusal, now int64) *vigilv1.DeadLetter {
	dl := &vigilv1.DeadLetter{
		SchemaVersion: publish.SchemaVersion, Reason: string(rf.Reason), Message: rf.Message, Source: m.source(),
		Origin: m.Origin, Field: rf.Field, Raw: s.raw, RefusedTimeMs: now, Tenant: in.Tenant, Patient: in.Patient,
		Device: in.Device, MessageId: msgID, ContentType: m.contentType(),
	}
	if !s.refusalIsDecode {
		// The sample decoded: keep it as sent (not normalised) so a
		// redrive need not re-parse raw.
		dl.Batch = &vigilv1.SampleBatch{SchemaVersion: publish.SchemaVersion, Tenant: in.Tenant, Patient: in.Patient,
			Device: in.Device, Source: m.source(), IngestTimeMs: now, MessageId: msgID,
			Samples: []*vigilv1.Sample{{Metric: in.Metric, Value: in.Value, Unit: in.Unit, EventTimeMs: in.EventTimeMs,
				Sequence: in.Sequence, Channel: in.Channel, SourceCode: sourceCode(in)}}}
	}
	return dl
}

// sourceCode is the code a refused sample was sent with.
func sourceCode(in *validate.Input) string {
	switch {
	case in.SourceCode != "":
		return in.SourceCode
	case in.LOINC != "":
		return "LOINC:" + in.LOINC
	}
	return ""
}

// refuseBody refuses a body as a whole, after dead-lettering it (bounded);
// rawSize, when not 0, is the size of the body of which data is a prefix.
func (h *Handler) refuseBody(ctx context.Context, e *bodyError, data []byte, m Meta, rawSize uint64, now int64) Outcome {
	dl := &vigilv1.DeadLetter{
		SchemaVersion: publish.SchemaVersion, Reason: string(e.reason), Message: e.Error(), Source: m.source(),
		Origin: m.Origin, Field: e.field, Raw: data, RefusedTimeMs: now, ContentType: m.contentType(), RawSize: rawSize,
		Tenant: m.Tenant, Device: m.Device,
	}
	h.log.Debug("request refused", "reason", e.reason, "err", e.Error(), "origin", m.Origin)
	if err := h.pub.DeadLetter(ctx, []*vigilv1.DeadLetter{dl}); err != nil {
		return h.failed(Outcome{}, err)
	}
	p := &Problem{Type: problemType(strings.ReplaceAll(string(e.reason), "_", "-")), Title: title(e.reason),
		Status: e.status, Detail: e.Error(), Reason: string(e.reason), Field: e.field, Rejected: 0}
	if e.offset >= 0 {
		off := e.offset
		p.Offset, p.Line, p.Column = &off, e.line, e.column
	}
	return Outcome{Problem: p}
}

func title(r validate.Reason) string {
	switch r {
	case validate.InvalidJSON:
		return "Invalid JSON"
	case validate.UnknownField:
		return "Unknown field"
	case validate.InvalidType:
		return "Field of the wrong type"
	case validate.MissingField:
		return "Missing field"
	case validate.InvalidID:
		return "Invalid identifier"
	case validate.BodyTooLarge:
		return "Body too large"
	case validate.TooManySamples:
		return "Too many samples"
	}
	return "Request refused"
}

// publishFailed answers a Kafka failure: 503 with Retry-After when a retry
// may succeed, else 500. Nothing of the request counts as accepted.
func (h *Handler) publishFailed(w http.ResponseWriter, err error, msgID string) int {
	if publish.IsRetriable(err) {
		w.Header().Set("Retry-After", "1")
		return WriteProblem(w, &Problem{Type: problemType("unavailable"), Title: "Kafka unavailable",
			Status: http.StatusServiceUnavailable, MessageID: msgID,
			Detail: "the samples could not be written to Kafka in time; nothing was accepted: retry the whole request (" + err.Error() + ")"})
	}
	return WriteProblem(w, &Problem{Type: problemType("publish-failed"), Title: "Publishing failed",
		Status: http.StatusInternalServerError, MessageID: msgID,
		Detail: "Kafka refused the samples; nothing was accepted (" + err.Error() + ")"})
}

// WriteProblem writes p as an application/problem+json answer with its
// status (500 if p cannot be encoded) and returns the status written. The
// other HTTP ingest endpoints (waveforms) answer with it too.
func WriteProblem(w http.ResponseWriter, p *Problem) int {
	body, err := json.Marshal(p)
	if err != nil {
		body = []byte(`{"type":"about:blank","title":"Internal error","status":500}`)
		p.Status = http.StatusInternalServerError
	}
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(p.Status)
	_, _ = w.Write(append(body, '\n'))
	return p.Status
}

func problemType(slug string) string { return ProblemTypeBase + slug }

func newMessageID(src vigilv1.Source) string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return src.Label() + "-" + hex.EncodeToString(b[:])
}
