// Package alertapi is the alerts HTTP API: a read model of the alert
// lifecycle topic (vigil.alerts.v1) and the acknowledgement command.
//
//	GET  /v1/alerts?state=open|acknowledged|all&patient=&ward=&tenant=&limit=
//	GET  /v1/alerts/{id}
//	POST /v1/alerts/{id}/ack   {"user": "...", "note": "..."}
//
// The read model holds every alert not over (open or acknowledged; bounded
// by alerts.api.max_open) and the alerts.api.max_closed most recently
// closed ones (resolved, re-checked away, suppressed); what the bounds drop
// is counted in vigil_alertapi_evicted_total. It is built by reading the
// whole topic from its start (read-committed) when the API starts, then
// following it.
//
// An acknowledgement is a command, not a write to the model: the API
// publishes it on the samples topic (a SampleBatch with no samples and an
// AlertCommand, keyed tenant/patient) and answers only once Kafka has it,
// so it is ordered with the patient's input and applied exactly once by
// the stream stage, which emits the ACKNOWLEDGED event. The API then waits
// up to alerts.api.ack_wait for that event to answer 200 with the alert,
// else 202 Accepted. Errors are application/problem+json.
package alertapi

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Publisher publishes sample batches durably (ingest/publish.Publisher):
// Publish blocks until Kafka acknowledged them.
type Publisher interface {
	Publish(ctx context.Context, batches []*vigilv1.SampleBatch) error
}

// Limits of the API's inputs.
const (
	maxBody     = 16 << 10
	maxUser     = 200
	maxNote     = 2000
	defaultList = 500
	maxList     = 5000
)

// API is the alerts HTTP API and its read model. Create it with New, mount
// its Handler, run it as a stage (Run follows the alerts topic until ctx
// ends), then Close it. Its handlers are safe for concurrent use.
type API struct {
	cfg   config.Config
	log   *slog.Logger
	clock clock.Clock
	pub   Publisher
	model *model
	m     *metrics

	mu     sync.Mutex
	cl     *kgo.Client
	closed bool
	// caughtUp is closed once the read model has read the topic to the
	// end it had when Run started.
	caughtUp chan struct{}
	once     sync.Once
}

type metrics struct {
	events   prometheus.Counter
	evicted  *prometheus.CounterVec
	acks     *prometheus.CounterVec
	held     *prometheus.GaugeVec
	unregFns []func() bool
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		events: prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_alertapi_events_total",
			Help: "Alert events folded into the alerts API read model."}),
		evicted: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_alertapi_evicted_total",
			Help: "Alerts dropped from the read model to keep it bounded (alerts.api.max_open / max_closed), by list."}, []string{"list"}),
		acks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_alertapi_acks_total",
			Help: "Acknowledgement requests by HTTP status answered."}, []string{"status"}),
		held: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "vigil_alertapi_alerts",
			Help: "Alerts held by the read model, by list (open, closed)."}, []string{"list"}),
	}
	for _, c := range []prometheus.Collector{m.events, m.evicted, m.acks, m.held} {
		if err := reg.Register(c); err != nil {
			for _, u := range m.unregFns {
				u()
			}
			return nil, fmt.Errorf("registering alert api metrics: %w", err)
		}
		m.unregFns = append(m.unregFns, func() bool { return reg.Unregister(c) })
	}
	return m, nil
}

// New creates the API; pub publishes acknowledgement commands. It
// connects to nothing until Run.
func New(cfg config.Config, deps stage.Deps, pub Publisher) (*API, error) {
	deps = deps.WithDefaults()
	if pub == nil {
		return nil, errors.New("alert api: no publisher for acknowledgements")
	}
	m, err := newMetrics(deps.Metrics)
	if err != nil {
		return nil, err
	}
	a := &API{cfg: cfg, log: deps.Log, clock: deps.Clock, pub: pub, m: m, caughtUp: make(chan struct{})}
	a.model = newModel(cfg.Alerts.API.MaxOpen, cfg.Alerts.API.MaxClosed, func(open bool) {
		l := "closed"
		if open {
			l = "open"
		}
		m.evicted.WithLabelValues(l).Inc()
		a.log.Warn("alert dropped from the read model to keep it bounded", "list", l)
	})
	return a, nil
}

// Mount registers the API's routes on mux (an httpserver.Server's Mount).
func (a *API) Mount(mount func(pattern string, h http.Handler)) {
	mount("GET /v1/alerts", http.HandlerFunc(a.list))
	mount("GET /v1/alerts/{id}", http.HandlerFunc(a.get))
	mount("POST /v1/alerts/{id}/ack", http.HandlerFunc(a.ack))
}

// CaughtUp is closed once the read model has read the alerts topic up to
// where it ended when Run started.
func (a *API) CaughtUp() <-chan struct{} { return a.caughtUp }

// Run reads the alerts topic from its start into the read model until ctx
// ends. Records that do not decode are logged and skipped.
func (a *API) Run(ctx context.Context) error {
	topic := a.cfg.Kafka.Topics.Alerts
	cl, err := kgo.NewClient(append(bus.ClientOpts(a.cfg.Kafka, a.log),
		kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
	)...)
	if err != nil {
		return fmt.Errorf("creating alerts topic consumer: %w", err)
	}
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		cl.Close()
		return nil
	}
	a.cl = cl
	a.mu.Unlock()
	ends := a.endOffsets(ctx, cl, topic)
	if len(ends) == 0 {
		a.once.Do(func() { close(a.caughtUp) })
	}
	for {
		// Until caught up, a poll that finds nothing within a short time
		// also means caught up (transaction markers end the partitions,
		// so the last record's offset may stay below the end offset).
		pctx, cancel := ctx, context.CancelFunc(func() {})
		select {
		case <-a.caughtUp:
		default:
			pctx, cancel = context.WithTimeout(ctx, 500*time.Millisecond)
		}
		fs := cl.PollFetches(pctx)
		cancel()
		if ctx.Err() != nil || fs.IsClientClosed() {
			return nil
		}
		if fs.NumRecords() == 0 && pctx.Err() != nil {
			a.once.Do(func() { close(a.caughtUp) })
		}
		fs.EachError(func(t string, p int32, err error) {
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
				return
			}
			a.log.Warn("reading alerts topic", "topic", t, "partition", p, "err", err)
		})
		fs.EachRecord(func(r *kgo.Record) {
			var ev vigilv1.AlertEvent
			if err := proto.Unmarshal(r.Value, &ev); err != nil {
				a.log.Warn("skipping undecodable alert event", "partition", r.Partition, "offset", r.Offset, "err", err)
			} else {
				a.model.apply(&ev)
				a.m.events.Inc()
			}
			if end, ok := ends[r.Partition]; ok && r.Offset+1 >= end {
				delete(ends, r.Partition)
				if len(ends) == 0 {
					a.once.Do(func() { close(a.caughtUp) })
				}
			}
		})
		o, c := a.model.counts()
		a.m.held.WithLabelValues("open").Set(float64(o))
		a.m.held.WithLabelValues("closed").Set(float64(c))
	}
}

// endOffsets returns the end offset of every non-empty partition of topic
// (nil when it cannot tell: the model is then taken as caught up at once).
func (a *API) endOffsets(ctx context.Context, cl *kgo.Client, topic string) map[int32]int64 {
	tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ends, err := listEnds(tctx, cl, topic)
	if err != nil {
		a.log.Warn("listing alerts topic end offsets", "err", err)
		return nil
	}
	return ends
}

func listEnds(ctx context.Context, cl *kgo.Client, topic string) (map[int32]int64, error) {
	ends, err := kadm.NewClient(cl).ListEndOffsets(ctx, topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return nil, fmt.Errorf("listing end offsets of %s: %w", topic, err)
	}
	out := map[int32]int64{}
	ends.Each(func(o kadm.ListedOffset) {
		if o.Offset > 0 {
			out[o.Partition] = o.Offset
		}
	})
	return out, nil
}

// Close stops Run's consumer. Idempotent.
func (a *API) Close(context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil
	}
	a.closed = true
	if a.cl != nil {
		a.cl.Close()
	}
	for _, u := range a.m.unregFns {
		u()
	}
	return nil
}

func problem(w http.ResponseWriter, status int, title, detail, field string) int {
	return httpjson.WriteProblem(w, &httpjson.Problem{Type: "about:blank", Title: title, Status: status, Detail: detail, Field: field})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		problem(w, http.StatusInternalServerError, "Internal error", "encoding the answer: "+err.Error(), "")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// list answers GET /v1/alerts.
func (a *API) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := Filter{State: q.Get("state"), Tenant: q.Get("tenant"), Patient: q.Get("patient"), Ward: q.Get("ward")}
	switch f.State {
	case "":
		f.State = "open"
	case "open", "acknowledged", "all":
	default:
		problem(w, http.StatusBadRequest, "Bad query", fmt.Sprintf("state %q is not open, acknowledged or all", f.State), "state")
		return
	}
	limit := defaultList
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > maxList {
			problem(w, http.StatusBadRequest, "Bad query", fmt.Sprintf("limit %q is not a number from 1 to %d", l, maxList), "limit")
			return
		}
		limit = n
	}
	alerts := a.model.list(f, limit)
	if alerts == nil {
		alerts = []Alert{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"alerts": alerts, "count": len(alerts)})
}

// get answers GET /v1/alerts/{id}.
func (a *API) get(w http.ResponseWriter, r *http.Request) {
	al, ok := a.model.get(r.PathValue("id"))
	if !ok {
		problem(w, http.StatusNotFound, "Unknown alert", fmt.Sprintf("no alert %q (unknown, or closed long ago and no longer held)", r.PathValue("id")), "id")
		return
	}
	writeJSON(w, http.StatusOK, al)
}

type ackRequest struct {
	User string `json:"user"`
	Note string `json:"note"`
}

// ack answers POST /v1/alerts/{id}/ack.
func (a *API) ack(w http.ResponseWriter, r *http.Request) {
	status := a.doAck(w, r)
	a.m.acks.WithLabelValues(strconv.Itoa(status)).Inc()
}

func (a *API) doAck(w http.ResponseWriter, r *http.Request) int {
	id := r.PathValue("id")
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		return problem(w, http.StatusRequestEntityTooLarge, "Body too large", fmt.Sprintf("the body must be at most %d bytes", maxBody), "")
	}
	var req ackRequest
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return problem(w, http.StatusBadRequest, "Malformed request", "the body must be a JSON object {\"user\", \"note\"}: "+err.Error(), "")
	}
	req.User = strings.TrimSpace(req.User)
	switch {
	case req.User == "":
		return problem(w, http.StatusBadRequest, "Malformed request", "user is required: who acknowledges", "user")
	case len(req.User) > maxUser || !utf8.ValidString(req.User):
		return problem(w, http.StatusBadRequest, "Malformed request", fmt.Sprintf("user must be valid UTF-8 of at most %d bytes", maxUser), "user")
	case len(req.Note) > maxNote || !utf8.ValidString(req.Note):
		return problem(w, http.StatusBadRequest, "Malformed request", fmt.Sprintf("note must be valid UTF-8 of at most %d bytes", maxNote), "note")
	}
	al, ok := a.model.get(id)
	switch {
	case !ok:
		return problem(w, http.StatusNotFound, "Unknown alert", fmt.Sprintf("no alert %q", id), "id")
	case al.State == "resolved" || al.State == "rechecked_away" || al.State == "suppressed":
		return problem(w, http.StatusConflict, "Alert is closed", fmt.Sprintf("alert %s is %s: there is nothing to acknowledge", id, al.State), "id")
	case al.State == "acknowledged":
		writeJSON(w, http.StatusOK, al)
		return http.StatusOK
	case al.State != "open":
		return problem(w, http.StatusConflict, "Alert is not open", fmt.Sprintf("alert %s is %s", id, al.State), "id")
	}
	var rnd [12]byte
	_, _ = rand.Read(rnd[:])
	cmdID := "ack-" + hex.EncodeToString(rnd[:])
	now := a.clock.Now().UnixMilli()
	ch, cancel := a.model.wait(cmdID)
	defer cancel()
	batch := &vigilv1.SampleBatch{
		Tenant: al.Tenant, Patient: al.Patient, Source: vigilv1.Source_SOURCE_HTTP, MessageId: cmdID,
		AlertCommand: &vigilv1.AlertCommand{AlertId: id, User: req.User, Note: req.Note, TimeMs: now, CommandId: cmdID},
	}
	if err := a.pub.Publish(r.Context(), []*vigilv1.SampleBatch{batch}); err != nil {
		a.log.Warn("publishing acknowledgement failed", "alert", id, "err", err)
		if publish.IsRetriable(err) {
			w.Header().Set("Retry-After", "1")
			return problem(w, http.StatusServiceUnavailable, "Kafka unavailable", "the acknowledgement could not be stored; retry", "")
		}
		return problem(w, http.StatusInternalServerError, "Internal error", "the acknowledgement could not be stored", "")
	}
	t := time.NewTimer(a.cfg.Alerts.API.AckWait)
	defer t.Stop()
	select {
	case got := <-ch:
		writeJSON(w, http.StatusOK, got)
		return http.StatusOK
	case <-t.C:
	case <-r.Context().Done():
	}
	writeJSON(w, http.StatusAccepted, map[string]any{"status": "accepted", "command_id": cmdID, "alert": al,
		"detail": "the acknowledgement is stored and will be applied in order with the patient's input"})
	return http.StatusAccepted
}
