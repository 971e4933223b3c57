package binding

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/clock"
)

// PathPattern is the path of the binding API (http.ServeMux syntax); {id} is
// the device id or bed key (percent-encode the '/' of a bed key as %2F:
// /v1/devices/bed:ICU1%2F12%2FA/binding).
const PathPattern = "/v1/devices/{id}/binding"

// maxBindingBody bounds a PUT body.
const maxBindingBody = 16 << 10

// PutRequest is the body of PUT /v1/devices/{id}/binding. From and To are
// RFC 3339 timestamps; From defaults to now, To to open.
type PutRequest struct {
	Tenant  string `json:"tenant"`
	Patient string `json:"patient"`
	From    string `json:"from,omitempty"`
	To      string `json:"to,omitempty"`
	// SetBy names who set the binding (a user); the remote address when
	// empty.
	SetBy string `json:"set_by,omitempty"`
}

// IntervalView is one interval as the API shows it, times in RFC 3339 UTC.
type IntervalView struct {
	Patient   string `json:"patient"`
	From      string `json:"from"`
	To        string `json:"to,omitempty"`
	Source    string `json:"source"`
	SetBy     string `json:"set_by,omitempty"`
	EndSource string `json:"end_source,omitempty"`
	Updated   string `json:"updated"`
}

// View is the answer of every binding request: the device's interval in
// force now (null when none) and its history, oldest first.
type View struct {
	Tenant  string         `json:"tenant"`
	Device  string         `json:"device"`
	Current *IntervalView  `json:"current"`
	History []IntervalView `json:"history"`
}

// Mounter is where the handler mounts its routes (internal/httpserver).
type Mounter interface {
	Mount(pattern string, h http.Handler)
}

// Handler serves the binding API on a Store:
//
//	PUT    /v1/devices/{id}/binding  {"tenant","patient","from","to","set_by"}  → 200 View
//	GET    /v1/devices/{id}/binding?tenant=T                              → 200 View, 404 when never bound
//	DELETE /v1/devices/{id}/binding?tenant=T[&at=RFC3339]                 → 200 View (ends the binding in force at `at`, default now)
//
// Errors are application/problem+json (httpjson.Problem) naming the field.
// Writes answer only once the binding is in Kafka and visible to this
// process. It is safe for concurrent use.
type Handler struct {
	store *Store
	log   *slog.Logger
	clock clock.Clock
}

// NewHandler returns the API handler of s.
func NewHandler(s *Store, log *slog.Logger, clk clock.Clock) *Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if clk == nil {
		clk = clock.System{}
	}
	return &Handler{store: s, log: log, clock: clk}
}

// Mount registers the three routes on m.
func (h *Handler) Mount(m Mounter) {
	m.Mount("PUT "+PathPattern, http.HandlerFunc(h.put))
	m.Mount("GET "+PathPattern, http.HandlerFunc(h.get))
	m.Mount("DELETE "+PathPattern, http.HandlerFunc(h.delete))
}

func (h *Handler) put(w http.ResponseWriter, r *http.Request) {
	device := r.PathValue("id")
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		problem(w, http.StatusUnsupportedMediaType, "unsupported-media-type", "Unsupported media type", "",
			fmt.Sprintf("Content-Type %q: send application/json", r.Header.Get("Content-Type")))
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBindingBody+1))
	if err != nil {
		problem(w, http.StatusBadRequest, "invalid-json", "Invalid JSON", "", "reading the body: "+err.Error())
		return
	}
	if len(body) > maxBindingBody {
		problem(w, http.StatusRequestEntityTooLarge, "body-too-large", "Body too large", "",
			fmt.Sprintf("the body is larger than %d bytes", maxBindingBody))
		return
	}
	req, field, err := DecodePut(body)
	if err != nil {
		problem(w, http.StatusBadRequest, "invalid-json", "Invalid JSON", field, err.Error())
		return
	}
	if rf := validate.CheckIDs(req.Tenant, req.Patient, device); rf != nil {
		if rf.Field == validate.FieldDevice {
			rf.Field = "id"
		}
		problem(w, http.StatusBadRequest, kebab(rf.Reason), "Invalid binding", rf.Field, rf.Message)
		return
	}
	now := h.clock.Now()
	from, ok := parseTime(w, "from", req.From, now)
	if !ok {
		return
	}
	var to int64
	if req.To != "" {
		if to, ok = parseTime(w, "to", req.To, now); !ok {
			return
		}
		if to <= from {
			problem(w, http.StatusBadRequest, "invalid-time", "Invalid binding", "to",
				fmt.Sprintf("to %s is not after from %s", req.To, fmtMs(from)))
			return
		}
	}
	setBy := req.SetBy
	if setBy == "" {
		setBy = r.RemoteAddr
	}
	err = h.store.Bind(r.Context(), Binding{Tenant: req.Tenant, Device: device, Patient: req.Patient,
		FromMs: from, ToMs: to, Source: SourceAPI, SetBy: setBy})
	if err != nil {
		h.writeFailed(w, err)
		return
	}
	h.log.Info("device bound", "tenant", req.Tenant, "device", device, "patient", req.Patient, "from", fmtMs(from), "set_by", setBy)
	h.view(w, req.Tenant, device, now.UnixMilli())
}

func (h *Handler) get(w http.ResponseWriter, r *http.Request) {
	tenant, device, ok := ids(w, r)
	if !ok {
		return
	}
	if err := h.store.Ready(r.Context()); err != nil {
		h.writeFailed(w, err)
		return
	}
	if len(h.store.Get(tenant, device)) == 0 {
		problem(w, http.StatusNotFound, "not-bound", "Device never bound", "id",
			fmt.Sprintf("device %q of tenant %q has no binding history", device, tenant))
		return
	}
	h.view(w, tenant, device, h.clock.Now().UnixMilli())
}

func (h *Handler) delete(w http.ResponseWriter, r *http.Request) {
	tenant, device, ok := ids(w, r)
	if !ok {
		return
	}
	now := h.clock.Now()
	at, ok := parseTime(w, "at", r.URL.Query().Get("at"), now)
	if !ok {
		return
	}
	if err := h.store.Release(r.Context(), tenant, device, at, SourceAPI); err != nil {
		h.writeFailed(w, err)
		return
	}
	h.log.Info("device released", "tenant", tenant, "device", device, "at", fmtMs(at))
	h.view(w, tenant, device, now.UnixMilli())
}

// DecodePut decodes a PUT body strictly (unknown fields and trailing data
// are errors). On error it also returns the offending field when known.
// It only reads body.
func DecodePut(body []byte) (req PutRequest, field string, err error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			field = te.Field
		} else if f, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			field = strings.Trim(f, `"`)
		}
		return PutRequest{}, field, fmt.Errorf("decoding the body: %w", err)
	}
	if dec.More() {
		return PutRequest{}, "", errors.New("decoding the body: data after the JSON object")
	}
	return req, "", nil
}

func ids(w http.ResponseWriter, r *http.Request) (tenant, device string, ok bool) {
	tenant, device = r.URL.Query().Get("tenant"), r.PathValue("id")
	if rf := validate.CheckIDs(tenant, "-", device); rf != nil {
		if rf.Field == validate.FieldDevice {
			rf.Field = "id"
		}
		problem(w, http.StatusBadRequest, kebab(rf.Reason), "Invalid request", rf.Field, rf.Message)
		return "", "", false
	}
	return tenant, device, true
}

func (h *Handler) view(w http.ResponseWriter, tenant, device string, nowMs int64) {
	v := View{Tenant: tenant, Device: device, History: []IntervalView{}}
	for _, iv := range h.store.Get(tenant, device) {
		x := IntervalView{Patient: iv.Patient, From: fmtMs(iv.FromMs), Source: iv.Source, SetBy: iv.SetBy,
			EndSource: iv.EndSource, Updated: fmtMs(iv.UpdatedMs)}
		if iv.ToMs != 0 {
			x.To = fmtMs(iv.ToMs)
		}
		v.History = append(v.History, x)
		if iv.Covers(nowMs) {
			c := x
			v.Current = &c
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// writeFailed answers a failed store call: 400 for invalid arguments, 503
// with Retry-After for Kafka trouble (nothing was changed, or the change is
// durable but not yet visible: retrying is safe as writes are idempotent).
func (h *Handler) writeFailed(w http.ResponseWriter, err error) {
	var inv *InvalidError
	if errors.As(err, &inv) {
		field, _, _ := strings.Cut(inv.Err.Error(), ":")
		problem(w, http.StatusBadRequest, "invalid-binding", "Invalid binding", field, err.Error())
		return
	}
	h.log.Warn("binding request failed", "err", err)
	w.Header().Set("Retry-After", "1")
	problem(w, http.StatusServiceUnavailable, "unavailable", "Binding store unavailable", "",
		"the binding could not be written or read in time; retry: "+err.Error())
}

func parseTime(w http.ResponseWriter, field, s string, now time.Time) (int64, bool) {
	if s == "" {
		return now.UnixMilli(), true
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		problem(w, http.StatusBadRequest, "invalid-time", "Invalid time", field,
			fmt.Sprintf("%s %q is not an RFC 3339 timestamp (e.g. 2026-11-23T08:00:00Z)", field, s))
		return 0, false
	}
	if t.UnixMilli() < 0 {
		problem(w, http.StatusBadRequest, "invalid-time", "Invalid time", field, fmt.Sprintf("%s %q is before the Unix epoch", field, s))
		return 0, false
	}
	return t.UnixMilli(), true
}

// ProblemTypeBase prefixes the type URI of every problem body (the same as
// the HTTP ingest API's).
const ProblemTypeBase = "urn:vigil:problem:"

// Problem is an RFC 7807 problem body (application/problem+json). It has
// the members of the ingest API's problems that apply here (httpjson.Problem
// adds accepted/rejected sample counts, which do not).
type Problem struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail,omitempty"`
	// Reason is machine-readable, snake_case (e.g. "invalid_time").
	Reason string `json:"reason,omitempty"`
	// Field names the offending request field: "tenant", "patient",
	// "from", "to", "at", "id" (the path's device id).
	Field string `json:"field,omitempty"`
}

func problem(w http.ResponseWriter, status int, slug, title, field, detail string) {
	p := Problem{Type: ProblemTypeBase + slug, Title: title, Status: status, Detail: detail,
		Field: field, Reason: strings.ReplaceAll(slug, "-", "_")}
	body, _ := json.Marshal(p)
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}

func kebab(r validate.Reason) string { return strings.ReplaceAll(string(r), "_", "-") }

func fmtMs(ms int64) string { return time.UnixMilli(ms).UTC().Format(time.RFC3339Nano) }
