package fhir

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
	"os"
	"strconv"
	"strings"
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

// ContentType is the FHIR JSON media type of every answer.
const ContentType = "application/fhir+json"

// Publisher is what the handler needs from publish.Publisher: both calls
// block until Kafka acknowledged every record and classify their errors with
// publish.IsRetriable.
type Publisher interface {
	Publish(ctx context.Context, batches []*vigilv1.SampleBatch) error
	DeadLetter(ctx context.Context, letters []*vigilv1.DeadLetter) error
}

// Options are the optional collaborators of a Handler.
type Options struct {
	// Codes returns the current mapping tables; it is called per resource
	// and must be cheap and safe for concurrent use (e.g. a hot-reloading
	// store's Tables method). Nil uses mapping.Default().
	Codes func() Codes
	// Binder resolves the patient of an Observation that names a device but
	// no subject. Nil: a subject is required.
	Binder Binder
}

// Handler serves the FHIR R4 endpoints (see the package documentation). It
// is safe for concurrent use; each request is answered only after Kafka
// acknowledged what it accepted and refused.
type Handler struct {
	cfg     config.FHIR
	pub     Publisher
	val     *validate.Validator
	log     *slog.Logger
	clock   clock.Clock
	maxBody int64
	codes   func() Codes
	binder  Binder

	requests  *prometheus.CounterVec
	resources *prometheus.CounterVec
	duration  prometheus.Histogram
}

// New creates the handler for cfg (the fhir section, http.max_body_bytes,
// the validation limits and catalogue of cfg.Ingest) publishing through pub,
// and registers its metrics on deps.Metrics.
func New(cfg config.Config, deps stage.Deps, pub Publisher, opts Options) (*Handler, error) {
	deps = deps.WithDefaults()
	if pub == nil {
		return nil, errors.New("creating fhir ingest: no publisher")
	}
	cat := catalog.Default()
	if cfg.Ingest.Catalog != "" {
		doc, err := os.ReadFile(cfg.Ingest.Catalog)
		if err != nil {
			return nil, fmt.Errorf("reading metric catalogue: %w", err)
		}
		if cat, err = catalog.Parse(doc); err != nil {
			return nil, fmt.Errorf("metric catalogue %s: %w", cfg.Ingest.Catalog, err)
		}
	}
	h := &Handler{
		cfg:     cfg.FHIR,
		pub:     pub,
		val:     validate.New(cat, validate.LimitsFrom(cfg.Ingest)),
		log:     deps.Log,
		clock:   deps.Clock,
		maxBody: cfg.HTTP.MaxBodyBytes,
		codes:   opts.Codes,
		binder:  opts.Binder,
	}
	if h.codes == nil {
		tables := mapping.Default()
		h.codes = func() Codes { return tables }
	}
	h.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_ingest_fhir_requests_total",
		Help: "FHIR requests answered, by interaction (create, batch, transaction, metadata) and HTTP status code.",
	}, []string{"interaction", "code"})
	h.resources = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_ingest_fhir_resources_total",
		Help: "FHIR resources processed, by outcome (accepted, refused, rolled_back); refusal reasons are counted on vigil_ingest_deadletters_total.",
	}, []string{"outcome"})
	h.duration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "vigil_ingest_fhir_request_seconds",
		Help:    "Time to answer a FHIR request, including the Kafka acknowledgement.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 12),
	})
	if err := stage.Register(deps.Metrics, "fhir ingest metrics", h.requests, h.resources, h.duration); err != nil {
		return nil, err
	}
	return h, nil
}

// Mount registers the endpoints with mount (e.g. httpserver.Server.Mount):
// POST /fhir/Observation, POST /fhir (Bundle), GET /fhir/metadata.
func (h *Handler) Mount(mount func(pattern string, handler http.Handler)) {
	mount("POST /fhir/Observation", h.timed("create", h.create))
	mount("POST /fhir", h.timed("bundle", h.bundle))
	mount("POST /fhir/{$}", h.timed("bundle", h.bundle))
	mount("GET /fhir/metadata", h.timed("metadata", h.metadata))
}

func (h *Handler) timed(interaction string, serve func(w http.ResponseWriter, r *http.Request) (string, int)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		name, code := serve(w, r)
		if name == "" {
			name = interaction
		}
		h.requests.WithLabelValues(name, strconv.Itoa(code)).Inc()
		h.duration.Observe(time.Since(start).Seconds())
	})
}

// reqCtx is one request's context.
type reqCtx struct {
	r      *http.Request
	tenant string
	now    int64
}

// begin checks the media type and reads the body; on failure it has
// answered and returns the status.
func (h *Handler) begin(w http.ResponseWriter, r *http.Request) (*reqCtx, []byte, int) {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || (mt != "application/fhir+json" && mt != "application/json" && mt != "application/json+fhir") {
		return nil, nil, writeOutcome(w, http.StatusUnsupportedMediaType, issue("error", "not-supported", "",
			fmt.Sprintf("Content-Type %q: send application/fhir+json (FHIR JSON); XML and RDF are not taken", r.Header.Get("Content-Type")), ""))
	}
	if ce := r.Header.Get("Content-Encoding"); ce != "" && !strings.EqualFold(ce, "identity") {
		return nil, nil, writeOutcome(w, http.StatusUnsupportedMediaType, issue("error", "not-supported", "",
			fmt.Sprintf("Content-Encoding %q is not supported: send the body uncompressed", ce), ""))
	}
	rc := &reqCtx{r: r, tenant: h.cfg.DefaultTenant, now: h.clock.Now().UnixMilli()}
	if t := r.Header.Get(h.cfg.TenantHeader); t != "" {
		rc.tenant = t
	}
	body, err := readBody(w, r, h.maxBody)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			rf := &refusal{validate.BodyTooLarge, "", fmt.Sprintf("the body is larger than %d bytes: split the Bundle", h.maxBody)}
			return nil, nil, h.refuseWhole(w, rc, rf, body, http.StatusRequestEntityTooLarge)
		}
		rf := &refusal{validate.MalformedMessage, "", fmt.Sprintf("reading the body failed after %d bytes: %v", len(body), err)}
		return nil, nil, h.refuseWhole(w, rc, rf, body, http.StatusBadRequest)
	}
	return rc, body, 0
}

func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, error) {
	size := r.ContentLength
	if size < 0 || size > limit {
		size = 4096
	}
	buf := bytes.NewBuffer(make([]byte, 0, size+1))
	_, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, limit))
	return buf.Bytes(), err
}

// create serves POST /fhir/Observation.
func (h *Handler) create(w http.ResponseWriter, r *http.Request) (string, int) {
	rc, body, code := h.begin(w, r)
	if rc == nil {
		return "", code
	}
	var p probe
	if de := decodeJSON(body, &p, "Observation"); de != nil {
		return "", h.refuseWhole(w, rc, &refusal{validate.MalformedMessage, "Observation", de.Msg}, body, http.StatusBadRequest)
	}
	if p.ResourceType == "Bundle" {
		return "", h.refuseWhole(w, rc, &refusal{validate.UnsupportedMessage, "Bundle",
			"a Bundle is posted to the base URL (POST /fhir), not to /fhir/Observation"}, body, http.StatusBadRequest)
	}
	id := newID()
	res := h.convert(body, &request{tenant: rc.tenant, nowMs: rc.now, root: "Observation", id: id})
	letters := h.letters(rc, res, body, id)
	if err := h.pub.DeadLetter(r.Context(), letters); err != nil {
		return "", h.publishFailed(w, err)
	}
	if res.refused != nil {
		h.resources.WithLabelValues("refused").Inc()
		oo := outcomeOf(res, "")
		return "", writeOutcome(w, statusFor(res.refused.reason), oo.Issue...)
	}
	if err := h.pub.Publish(r.Context(), res.batches); err != nil {
		return "", h.publishFailed(w, err)
	}
	h.resources.WithLabelValues("accepted").Inc()
	now := h.clock.Now().UTC()
	w.Header().Set("Location", baseURL(r)+"/Observation/"+id+"/_history/1")
	w.Header().Set("ETag", `W/"1"`)
	w.Header().Set("Last-Modified", now.Format(http.TimeFormat))
	switch prefer(r) {
	case "minimal":
		w.WriteHeader(http.StatusCreated)
		return "", http.StatusCreated
	case "OperationOutcome":
		return "", writeOutcome(w, http.StatusCreated, outcomeOf(res, "").Issue...)
	case "":
		if len(res.partial) > 0 {
			// Do not hide a refused component behind the resource.
			return "", writeOutcome(w, http.StatusCreated, outcomeOf(res, "").Issue...)
		}
	}
	return "", writeJSON(w, http.StatusCreated, representation(body, id, now))
}

// prefer returns the Prefer header's return= value.
func prefer(r *http.Request) string {
	for _, v := range r.Header.Values("Prefer") {
		for _, part := range strings.Split(v, ";") {
			if k, val, ok := strings.Cut(strings.TrimSpace(part), "="); ok && strings.EqualFold(k, "return") {
				return strings.Trim(val, `"`)
			}
		}
	}
	return ""
}

// representation is the created resource: the body with its new id and
// meta (unknown elements kept as sent).
func representation(body []byte, id string, now time.Time) any {
	var m map[string]json.RawMessage
	if json.Unmarshal(body, &m) != nil {
		return nil
	}
	m["id"], _ = json.Marshal(id)
	m["meta"], _ = json.Marshal(map[string]string{"versionId": "1", "lastUpdated": now.Format(time.RFC3339Nano)})
	return m
}

func baseURL(r *http.Request) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host + "/fhir"
}

// bundle serves POST /fhir with a batch or transaction Bundle.
func (h *Handler) bundle(w http.ResponseWriter, r *http.Request) (string, int) {
	rc, body, code := h.begin(w, r)
	if rc == nil {
		return "", code
	}
	var b bundle
	if de := decodeJSON(body, &b, "Bundle"); de != nil {
		expr := de.Path
		if expr == "" {
			expr = "Bundle"
		}
		return "", h.refuseWhole(w, rc, &refusal{validate.MalformedMessage, expr, de.Msg}, body, http.StatusBadRequest)
	}
	if b.ResourceType != "Bundle" {
		msg := "POST /fhir takes a Bundle of type batch or transaction; post an Observation to /fhir/Observation"
		if b.ResourceType == "" {
			msg = "no resourceType: " + msg
		}
		return "", h.refuseWhole(w, rc, &refusal{validate.UnsupportedMessage, "Bundle.resourceType", msg}, body, http.StatusBadRequest)
	}
	if b.Type != "batch" && b.Type != "transaction" {
		return b.Type, h.refuseWhole(w, rc, &refusal{validate.UnsupportedMessage, "Bundle.type",
			fmt.Sprintf("Bundle type %q is not processed: send type batch or transaction", clip(b.Type))}, body, http.StatusBadRequest)
	}
	if len(b.Entry) > h.cfg.MaxBundleEntries {
		return b.Type, h.refuseWhole(w, rc, &refusal{validate.TooManySamples, "Bundle.entry",
			fmt.Sprintf("the Bundle has %d entries (at most %d, fhir.max_bundle_entries): split it", len(b.Entry), h.cfg.MaxBundleEntries)},
			body, http.StatusRequestEntityTooLarge)
	}
	inBundle := memberIndex(b.Entry)
	results := make([]*converted, len(b.Entry))
	ids := make([]string, len(b.Entry))
	var letters []*vigilv1.DeadLetter
	var batches []*vigilv1.SampleBatch
	refused := 0
	for i := range b.Entry {
		e := &b.Entry[i]
		ids[i] = newID()
		root := fmt.Sprintf("Bundle.entry[%d].resource", i)
		var res *converted
		switch {
		case e.Request == nil || (e.Request.Method != "POST" && e.Request.Method != "PUT"):
			res = &converted{tenant: rc.tenant, refused: &refusal{validate.UnsupportedMessage, fmt.Sprintf("Bundle.entry[%d].request.method", i),
				"the entry needs request.method POST (create an Observation); other interactions are not supported"}}
		case !strings.HasPrefix(e.Request.URL, "Observation") && !strings.Contains(e.Request.URL, "/Observation"):
			res = &converted{tenant: rc.tenant, refused: &refusal{validate.UnsupportedMessage, fmt.Sprintf("Bundle.entry[%d].request.url", i),
				fmt.Sprintf("request.url %q: only Observation resources are taken", clip(e.Request.URL))}}
		case len(e.Resource) == 0 || string(e.Resource) == "null":
			res = &converted{tenant: rc.tenant, refused: &refusal{validate.MissingField, root, "the entry has no resource"}}
		default:
			res = h.convert(e.Resource, &request{tenant: rc.tenant, nowMs: rc.now, root: root, id: ids[i], inBundle: inBundle})
		}
		results[i] = res
		letters = append(letters, h.letters(rc, res, e.Resource, ids[i])...)
		if res.refused != nil {
			refused++
			continue
		}
		batches = append(batches, res.batches...)
	}
	if err := h.pub.DeadLetter(r.Context(), letters); err != nil {
		return b.Type, h.publishFailed(w, err)
	}
	if b.Type == "transaction" && refused > 0 {
		h.resources.WithLabelValues("refused").Add(float64(refused))
		h.resources.WithLabelValues("rolled_back").Add(float64(len(b.Entry) - refused))
		var issues []Issue
		for _, res := range results {
			if res.refused != nil {
				issues = append(issues, outcomeOf(res, "").Issue...)
			}
		}
		issues = append(issues, issue("information", "processing", "", fmt.Sprintf(
			"transaction refused: %d of %d entries were refused, so none was accepted; fix them and send the whole transaction again",
			refused, len(b.Entry)), ""))
		return b.Type, writeOutcome(w, http.StatusBadRequest, issues...)
	}
	if err := h.pub.Publish(r.Context(), batches); err != nil {
		return b.Type, h.publishFailed(w, err)
	}
	h.resources.WithLabelValues("refused").Add(float64(refused))
	h.resources.WithLabelValues("accepted").Add(float64(len(b.Entry) - refused))
	now := h.clock.Now().UTC()
	resp := Bundle{ResourceType: "Bundle", ID: newID(), Type: b.Type + "-response", Entry: make([]Entry, len(b.Entry))}
	for i, res := range results {
		er := &EntryResponse{}
		switch {
		case res.refused != nil:
			er.Status = statusLine(statusFor(res.refused.reason))
			er.Outcome = outcomeOf(res, "")
		case res.grouping:
			er.Status = "200 OK"
			er.Outcome = outcomeOf(res, "")
		default:
			er.Status = "201 Created"
			er.Location = "Observation/" + ids[i] + "/_history/1"
			er.Etag = `W/"1"`
			er.LastModified = now.Format(time.RFC3339Nano)
			if len(res.partial) > 0 || len(res.notes) > 0 {
				er.Outcome = outcomeOf(res, "")
			}
		}
		resp.Entry[i] = Entry{FullURL: b.Entry[i].FullURL, Response: er}
	}
	return b.Type, writeJSON(w, http.StatusOK, resp)
}

// memberIndex returns a function telling whether a reference names an
// entry of the Bundle (by fullUrl, or Observation/<id> of an entry's
// resource). The index is built on first use.
func memberIndex(entries []bundleEntry) func(ref string) bool {
	var idx map[string]bool
	return func(ref string) bool {
		if idx == nil {
			idx = make(map[string]bool, 2*len(entries))
			for _, e := range entries {
				if e.FullURL != "" {
					idx[e.FullURL] = true
				}
				var p struct {
					ResourceType string `json:"resourceType"`
					ID           string `json:"id"`
				}
				if json.Unmarshal(e.Resource, &p) == nil && p.ResourceType == "Observation" && p.ID != "" {
					idx["Observation/"+p.ID] = true
				}
			}
		}
		return idx[ref]
	}
}

// letters builds the dead letters of res: one for a refused resource, one
// per refused part of an accepted one.
func (h *Handler) letters(rc *reqCtx, res *converted, raw []byte, id string) []*vigilv1.DeadLetter {
	var out []*vigilv1.DeadLetter
	add := func(rf *refusal) {
		out = append(out, &vigilv1.DeadLetter{
			SchemaVersion: publish.SchemaVersion, Reason: string(rf.reason), Message: rf.msg, Source: vigilv1.Source_SOURCE_FHIR,
			Origin: rc.r.RemoteAddr, Field: rf.expr, Raw: raw, RefusedTimeMs: rc.now, Tenant: res.tenant,
			Patient: res.patient, Device: res.device, MessageId: id, ContentType: ContentType,
		})
	}
	if res.refused != nil {
		add(res.refused)
	}
	for i := range res.partial {
		add(&res.partial[i])
	}
	return out
}

// refuseWhole dead-letters a request refused as a whole and answers it.
func (h *Handler) refuseWhole(w http.ResponseWriter, rc *reqCtx, rf *refusal, body []byte, status int) int {
	dl := &vigilv1.DeadLetter{
		SchemaVersion: publish.SchemaVersion, Reason: string(rf.reason), Message: rf.msg, Source: vigilv1.Source_SOURCE_FHIR,
		Origin: rc.r.RemoteAddr, Field: rf.expr, Raw: body, RefusedTimeMs: rc.now, Tenant: rc.tenant, ContentType: ContentType,
	}
	if status == http.StatusRequestEntityTooLarge && rc.r.ContentLength > int64(len(body)) {
		dl.RawSize = uint64(rc.r.ContentLength)
	}
	h.log.Debug("fhir request refused", "reason", rf.reason, "err", rf.msg, "remote", rc.r.RemoteAddr)
	if err := h.pub.DeadLetter(rc.r.Context(), []*vigilv1.DeadLetter{dl}); err != nil {
		return h.publishFailed(w, err)
	}
	h.resources.WithLabelValues("refused").Inc()
	return writeOutcome(w, status, refusalIssue(rf, "error"))
}

// publishFailed answers a Kafka failure: 503 with Retry-After when a retry
// may succeed, else 500. Nothing of the request counts as accepted.
func (h *Handler) publishFailed(w http.ResponseWriter, err error) int {
	if publish.IsRetriable(err) {
		w.Header().Set("Retry-After", "1")
		return writeOutcome(w, http.StatusServiceUnavailable, issue("error", "transient", "",
			"the data could not be written to Kafka in time; nothing was accepted: retry the whole request ("+err.Error()+")", ""))
	}
	h.log.Error("fhir publishing failed permanently", "err", err)
	return writeOutcome(w, http.StatusInternalServerError, issue("fatal", "exception", "",
		"Kafka refused the data; nothing was accepted ("+err.Error()+")", ""))
}

// statusFor is the HTTP status of a refusal: 400 when the content is not
// valid FHIR (or not what the endpoint takes), 422 when it is valid FHIR
// that Vigil's rules refuse (not a vital sign, no value, unit, range, time).
func statusFor(r validate.Reason) int {
	switch r {
	case validate.MalformedMessage, validate.InvalidJSON, validate.InvalidType, validate.UnknownField,
		validate.MissingField, validate.InvalidID, validate.UnsupportedMessage:
		return http.StatusBadRequest
	case validate.BodyTooLarge, validate.TooManySamples:
		return http.StatusRequestEntityTooLarge
	}
	return http.StatusUnprocessableEntity
}

func statusLine(code int) string { return strconv.Itoa(code) + " " + http.StatusText(code) }

func writeJSON(w http.ResponseWriter, status int, v any) int {
	body, err := json.Marshal(v)
	if err != nil {
		return writeOutcome(w, http.StatusInternalServerError, issue("fatal", "exception", "", "encoding the answer: "+err.Error(), ""))
	}
	w.Header().Set("Content-Type", ContentType+"; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
	return status
}

func writeOutcome(w http.ResponseWriter, status int, issues ...Issue) int {
	return writeJSON(w, status, &OperationOutcome{ResourceType: "OperationOutcome", Issue: issues})
}

func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func fmtMs(ms int64) string { return time.UnixMilli(ms).UTC().Format("2006-01-02T15:04:05.000Z") }

// metadata serves GET /fhir/metadata: a minimal CapabilityStatement.
func (h *Handler) metadata(w http.ResponseWriter, r *http.Request) (string, int) {
	_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, 4096))
	return "", writeJSON(w, http.StatusOK, capability(baseURL(r), h.clock.Now().UTC()))
}
