package waveform

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"mime"
	"net/http"
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Path is where the handler is meant to be mounted (POST).
const Path = "/v1/waveforms"

// DeadLetterer writes refused requests to the dead-letter topic, blocking
// until Kafka acknowledged them (publish.Publisher does).
type DeadLetterer interface {
	DeadLetter(ctx context.Context, letters []*vigilv1.DeadLetter) error
}

// Handler serves POST /v1/waveforms: it decodes a Request, hands the chunk
// to a Processor and answers 200 {"accepted_samples": n, "rr_intervals": k}
// once the chunk's RR intervals are in Kafka. A refused body is answered
// with an application/problem+json body (the httpjson.Problem shape) naming
// the reason and field, after it was dead-lettered: 400 (invalid JSON,
// unknown, missing or mistyped member, bad identifier, rate out of range,
// unknown unit), 413 (body over http.max_body_bytes or more values than
// waveform.max_chunk_samples), 415 (not application/json), 405 (not POST).
// Kafka failures answer 503 with Retry-After (retry the same chunk: the
// detector was rolled back) or 500. Safe for concurrent use.
type Handler struct {
	proc    *Processor
	dl      DeadLetterer
	log     *slog.Logger
	clock   clock.Clock
	maxBody int64
	// rawLimit bounds the raw bytes kept on a dead letter.
	rawLimit int

	requests *prometheus.CounterVec
}

// NewHandler serves proc, dead-lettering refusals through dl, reading
// bodies up to maxBody bytes, and registers its metrics on deps.Metrics.
func NewHandler(proc *Processor, dl DeadLetterer, maxBody int64, rawLimit int, deps stage.Deps) (*Handler, error) {
	if proc == nil || dl == nil {
		return nil, errors.New("creating waveform handler: no processor or dead-letter writer")
	}
	deps = deps.WithDefaults()
	h := &Handler{proc: proc, dl: dl, log: deps.Log, clock: deps.Clock, maxBody: maxBody, rawLimit: rawLimit,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_waveform_http_requests_total",
			Help: "POST /v1/waveforms requests answered, by HTTP status code.",
		}, []string{"code"}),
	}
	if err := stage.Register(deps.Metrics, "waveform http metrics", h.requests); err != nil {
		return nil, err
	}
	return h, nil
}

// Response is the 200 answer.
type Response struct {
	AcceptedSamples int `json:"accepted_samples"`
	RRIntervals     int `json:"rr_intervals"`
}

// ServeHTTP answers one request.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	code := h.serve(w, r)
	h.requests.WithLabelValues(strconv.Itoa(code)).Inc()
}

func (h *Handler) serve(w http.ResponseWriter, r *http.Request) int {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		return httpjson.WriteProblem(w, &httpjson.Problem{Type: httpjson.ProblemTypeBase + "method-not-allowed",
			Title: "Method not allowed", Status: http.StatusMethodNotAllowed, Detail: r.Method + " " + r.URL.Path + ": use POST"})
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return httpjson.WriteProblem(w, &httpjson.Problem{Type: httpjson.ProblemTypeBase + "unsupported-media-type",
			Title: "Unsupported media type", Status: http.StatusUnsupportedMediaType,
			Detail: fmt.Sprintf("Content-Type %q: send application/json", r.Header.Get("Content-Type"))})
	}
	var buf bytes.Buffer
	_, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, h.maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return h.refuse(r, w, buf.Bytes(), nil, &DecodeError{Reason: validate.BodyTooLarge, Offset: -1,
				Message: fmt.Sprintf("the body is larger than %d bytes: split the waveform into chunks", h.maxBody)},
				http.StatusRequestEntityTooLarge)
		}
		return h.refuse(r, w, buf.Bytes(), nil, &DecodeError{Reason: validate.InvalidJSON, Offset: int64(buf.Len()),
			Message: fmt.Sprintf("reading the body: %v", err)}, http.StatusBadRequest)
	}
	req, derr := Decode(buf.Bytes(), h.proc.opts.MaxChunkSamples)
	if derr != nil {
		return h.refuse(r, w, buf.Bytes(), nil, derr, statusOf(derr.Reason))
	}
	msgID := req.MessageID
	if msgID == "" {
		var b [12]byte
		_, _ = rand.Read(b[:])
		msgID = "http-" + hex.EncodeToString(b[:])
	}
	if rf := validate.CheckID("message_id", msgID, httpjson.MaxMessageIDLen); rf != nil {
		return h.refuse(r, w, buf.Bytes(), req, &DecodeError{Reason: rf.Reason, Field: "message_id", Message: rf.Message, Offset: -1}, http.StatusBadRequest)
	}
	c := &Chunk{Tenant: req.Tenant, Patient: req.Patient, Device: req.Device, Channel: req.Channel, Metric: req.Metric,
		Unit: req.Unit, RateHz: req.RateHz, StartMs: req.StartMs, Values: req.Values, Source: vigilv1.Source_SOURCE_HTTP,
		MessageID: msgID}
	res, err := h.proc.Process(r.Context(), c)
	var ce *ChunkError
	switch {
	case errors.As(err, &ce):
		return h.refuse(r, w, buf.Bytes(), req, &DecodeError{Reason: ce.Reason, Field: ce.Field, Message: ce.Message, Offset: -1},
			statusOf(ce.Reason))
	case err != nil:
		return h.publishFailed(w, err, msgID)
	}
	body, _ := json.Marshal(Response{AcceptedSamples: res.Samples, RRIntervals: res.RRIntervals})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(append(body, '\n'))
	return http.StatusOK
}

// refuse dead-letters the body (bounded) and answers the problem.
func (h *Handler) refuse(r *http.Request, w http.ResponseWriter, raw []byte, req *Request, e *DecodeError, status int) int {
	dl := &vigilv1.DeadLetter{
		SchemaVersion: publish.SchemaVersion, Reason: string(e.Reason), Message: e.Error(), Source: vigilv1.Source_SOURCE_HTTP,
		Origin: r.RemoteAddr, Field: e.Field, Raw: raw, RefusedTimeMs: h.clock.Now().UnixMilli(), ContentType: "application/json",
	}
	if req != nil {
		dl.Tenant, dl.Patient, dl.Device, dl.MessageId = req.Tenant, req.Patient, req.Device, req.MessageID
	}
	publish.TruncateRaw(dl, h.rawLimit)
	if err := h.dl.DeadLetter(r.Context(), []*vigilv1.DeadLetter{dl}); err != nil {
		return h.publishFailed(w, err, "")
	}
	h.log.Debug("waveform refused", "reason", e.Reason, "field", e.Field, "err", e.Message, "origin", r.RemoteAddr)
	p := &httpjson.Problem{Type: httpjson.ProblemTypeBase + strings.ReplaceAll(string(e.Reason), "_", "-"),
		Title: "Waveform refused", Status: status, Detail: e.Error(), Reason: string(e.Reason), Field: e.Field}
	if e.Offset >= 0 {
		off := e.Offset
		p.Offset = &off
	}
	return httpjson.WriteProblem(w, p)
}

func (h *Handler) publishFailed(w http.ResponseWriter, err error, msgID string) int {
	if publish.IsRetriable(err) {
		w.Header().Set("Retry-After", "1")
		return httpjson.WriteProblem(w, &httpjson.Problem{Type: httpjson.ProblemTypeBase + "unavailable", Title: "Kafka unavailable",
			Status: http.StatusServiceUnavailable, MessageID: msgID,
			Detail: "the RR intervals could not be written to Kafka in time; nothing was accepted: retry the same chunk (" + err.Error() + ")"})
	}
	return httpjson.WriteProblem(w, &httpjson.Problem{Type: httpjson.ProblemTypeBase + "publish-failed", Title: "Publishing failed",
		Status: http.StatusInternalServerError, MessageID: msgID, Detail: "Kafka refused the RR intervals (" + err.Error() + ")"})
}

func statusOf(r validate.Reason) int {
	if r == validate.TooManySamples || r == validate.BodyTooLarge {
		return http.StatusRequestEntityTooLarge
	}
	return http.StatusBadRequest
}
