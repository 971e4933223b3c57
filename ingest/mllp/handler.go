package mllp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/binding"
	"github.com/vigilhealth/vigil/ingest/dedupe"
	"github.com/vigilhealth/vigil/ingest/hl7"
	"github.com/vigilhealth/vigil/ingest/mapping"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/ratelimit"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/ingest/waveform"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Publisher is what the handler needs from publish.Publisher: both calls
// block until Kafka acknowledged every record and classify their errors with
// publish.IsRetriable.
type Publisher interface {
	Publish(ctx context.Context, batches []*vigilv1.SampleBatch) error
	DeadLetter(ctx context.Context, letters []*vigilv1.DeadLetter) error
}

// Binder keeps the device/bed → patient bindings (ingest/binding's Store
// satisfies it). Resolve must not block on I/O; ApplyADT blocks until the
// change is durable and returns *binding.InvalidError for an event it
// refuses, other errors being classified by publish.IsRetriable. It must be
// safe for concurrent use.
type Binder interface {
	hl7.Resolver
	ApplyADT(ctx context.Context, ev binding.ADTEvent) error
}

// Handler answers one HL7 v2 message at a time: it parses it, publishes
// what it yields, and returns the ACK. It is what the MLLP server runs for
// every frame, and is safe for concurrent use.
type Handler struct {
	pub     Publisher
	dec     *hl7.Decoder
	binder  Binder
	wave    waveform.Sink
	log     *slog.Logger
	clock   clock.Clock
	tenant  string
	tenants map[string]string
	// dedupe remembers the accepted messages (nil: no duplicate
	// suppression).
	dedupe *dedupe.Filter
	// inflight holds the dedupe keys of the messages being processed, so
	// that a copy sent again while the first is still waiting for Kafka
	// (the sender gave up waiting for the ACK and re-sent it on another
	// connection) waits for the first's outcome instead of being
	// published a second time. Guarded by inflightMu; it holds at most one
	// entry per message being handled, so it is bounded by
	// mllp.max_connections.
	inflightMu sync.Mutex
	inflight   map[dedupe.Key]chan struct{}
	// repeats remembers the published observations (patient, device,
	// channel, metric, event time, value), so that one reported again in
	// a later message (a monitor repeating its last NIBP, a gateway
	// re-sending history under new control ids) is stored once. Same
	// window and bound as dedupe; nil with it.
	repeats  *dedupe.Filter
	limiter  *ratelimit.Limiter
	maxWait  time.Duration
	timeout  time.Duration
	ackSeq   atomic.Uint64
	ackStamp string

	m *handlerMetrics
}

type handlerMetrics struct {
	messages   *prometheus.CounterVec
	duplicates prometheus.Counter
	repeats    prometheus.Counter
	bindings   *prometheus.CounterVec
	waveforms  *prometheus.CounterVec
	latency    prometheus.Histogram
}

func newHandlerMetrics() *handlerMetrics {
	return &handlerMetrics{
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_mllp_messages_total",
			Help: "HL7 v2 messages answered, by message type (MSH-9.1, or \"unparsed\") and acknowledgment code (AA, AE, AR).",
		}, []string{"type", "ack"}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_mllp_duplicates_total",
			Help: "Messages whose control id (MSH-10) was already accepted within the dedupe window: ACKed AA again, not republished.",
		}),
		repeats: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_mllp_repeated_observations_total",
			Help: "Observations not published again because the same one (patient, device, channel, metric, time, value) was published within mllp.dedupe_window.",
		}),
		bindings: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_mllp_binding_changes_total",
			Help: "ADT events applied to the device/bed bindings, by kind (admit, transfer, discharge, update; skipped when no binding store is configured).",
		}, []string{"kind"}),
		waveforms: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_mllp_waveforms_total",
			Help: "Waveform (NA) observations handed to the waveform processor, by result (ok, refused).",
		}, []string{"result"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "vigil_mllp_ack_seconds",
			Help:    "Time from a whole frame read to its ACK being ready, Kafka acknowledgement included.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 12),
		}),
	}
}

func (m *handlerMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.messages, m.duplicates, m.repeats, m.bindings, m.waveforms, m.latency}
}

// Options are the collaborators of the MLLP ingest path.
type Options struct {
	// Publisher writes samples and dead letters; required.
	Publisher Publisher
	// Codes maps MDC/LOINC/UCUM codes; nil uses mapping.Default() (use
	// hl7.StoreCodes for hot-reloaded tables).
	Codes hl7.Codes
	// Binder keeps device/bed bindings; nil: ADT is ACKed without binding
	// changes and ORU without PID-3 is dead-lettered as unbound_device.
	Binder Binder
	// Waveform takes NA (waveform) observations; nil refuses them.
	Waveform waveform.Sink
}

// maxRateSources bounds the rate-limit buckets kept (one per sending
// facility, else remote host).
const maxRateSources = 10_000

// register registers the handler's metrics, its duplicate filter's
// (filter="mllp_messages") and its rate limiter's (source="mllp").
func (h *Handler) register(reg prometheus.Registerer) error {
	if err := stage.Register(reg, "mllp metrics", h.m.collectors()...); err != nil {
		return err
	}
	if h.dedupe != nil {
		if err := h.dedupe.Register(reg, "mllp_messages"); err != nil {
			return err
		}
		if err := h.repeats.Register(reg, "mllp_observations"); err != nil {
			return err
		}
	}
	return h.limiter.Register(reg, "mllp")
}

func newHandler(cfg config.Config, log *slog.Logger, clk clock.Clock, val *validate.Validator, opts Options, m *handlerMetrics) *Handler {
	codes := opts.Codes
	if codes == nil {
		codes = mapping.Default()
	}
	h := &Handler{
		pub:     opts.Publisher,
		dec:     &hl7.Decoder{Codes: codes, Validator: val, Waveforms: opts.Waveform != nil},
		binder:  opts.Binder,
		wave:    opts.Waveform,
		log:     log,
		clock:   clk,
		tenant:  cfg.MLLP.Tenant,
		tenants: cfg.MLLP.Tenants,
		maxWait: cfg.MLLP.AckTimeout / 2,
		timeout: cfg.MLLP.AckTimeout,
		m:       m,
	}
	if cfg.MLLP.DedupeWindow > 0 {
		h.dedupe = dedupe.New(cfg.MLLP.DedupeWindow, cfg.MLLP.DedupeSize, clk)
		h.repeats = dedupe.New(cfg.MLLP.DedupeWindow, cfg.MLLP.DedupeSize, clk)
	}
	h.limiter = ratelimit.New(cfg.MLLP.RateLimit, cfg.MLLP.RateBurst, maxRateSources, clk)
	h.ackStamp = strconv.FormatInt(clk.Now().UnixMilli(), 36)
	return h
}

// Handle answers one message (the payload of one MLLP frame; the handler
// does not keep raw after it returns) received from remote, and returns
// the ACK to send. It blocks until what the message yielded is durable in
// Kafka (or refused), within mllp.ack_timeout and ctx:
//
//   - AA: accepted (samples published, refusals dead-lettered; an ERR
//     segment of severity W names each refused observation);
//   - AE: not accepted for a passing reason (Kafka unavailable, timeout,
//     shutting down): nothing was dead-lettered, send it again;
//   - AR: refused for good (malformed, unsupported type or version, every
//     observation refused): the message is on the dead-letter topic.
func (h *Handler) Handle(ctx context.Context, raw []byte, remote string) []byte {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, h.timeout)
	defer cancel()
	typ, ack := h.handle(ctx, raw, remote)
	code := "AA"
	if i := bytes.Index(ack, []byte("\rMSA|")); i >= 0 && len(ack) >= i+7 {
		code = string(ack[i+5 : i+7])
	}
	h.m.messages.WithLabelValues(typ, code).Inc()
	h.m.latency.Observe(time.Since(start).Seconds())
	return ack
}

func (h *Handler) ackID() string {
	return "VIGIL" + h.ackStamp + "-" + strconv.FormatUint(h.ackSeq.Add(1), 10)
}

func (h *Handler) ack(hd hl7.Header, code string, issues []hl7.Issue) []byte {
	return hl7.BuildACK(make([]byte, 0, 256), hd, code, issues, h.clock.Now(), h.ackID())
}

// tenantOf maps the sending facility onto a tenant.
func (h *Handler) tenantOf(facility string) string {
	if t, ok := h.tenants[facility]; ok {
		return t
	}
	return h.tenant
}

func (h *Handler) handle(ctx context.Context, raw []byte, remote string) (string, []byte) {
	m, err := hl7.Parse(raw)
	if err != nil {
		var pe *hl7.ParseError
		if !errors.As(err, &pe) {
			pe = &hl7.ParseError{Code: hl7.CodeInternalError, Message: err.Error()}
		}
		hd := headerOnly(raw)
		iss := hl7.IssueFromParse(pe)
		return "unparsed", h.refuse(ctx, hd, h.tenantOf(hd.SendingFacility), remote, raw, iss)
	}
	hd := hl7.ReadHeader(m)
	tenant := h.tenantOf(hd.SendingFacility)
	typ := hd.Type
	if len(typ) > 3 || typ == "" {
		typ = "other"
	}
	if hd.ControlID == "" {
		return typ, h.refuse(ctx, hd, tenant, remote, raw, hl7.Issue{Segment: "MSH", Sequence: 1, Field: 10,
			Code: hl7.CodeRequiredMissing, Severity: hl7.SeverityError, Reason: validate.MalformedMessage, Message: "no message control id (MSH-10)"})
	}
	if !hl7.SupportedVersion(hd.Version) {
		return typ, h.refuse(ctx, hd, tenant, remote, raw, hl7.Issue{Segment: "MSH", Sequence: 1, Field: 12,
			Code: hl7.CodeUnsupportedVersion, Severity: hl7.SeverityError, Reason: validate.UnsupportedMessage,
			Message: fmt.Sprintf("HL7 version %q is not taken: send 2.3 to 2.8", hd.Version)})
	}
	if r := validate.CheckID("tenant", tenant, validate.MaxTenantLen); r != nil {
		return typ, h.refuse(ctx, hd, tenant, remote, raw, hl7.Issue{Segment: "MSH", Sequence: 1, Field: 4,
			Code: hl7.CodeTableValue, Severity: hl7.SeverityError, Reason: r.Reason, Message: r.Message})
	}
	// The rate limit slows this sender's ACK (and so, as MLLP senders wait
	// for it, the sender) before any work is done.
	src := hd.SendingFacility
	if src == "" {
		src, _, _ = net.SplitHostPort(remote)
	}
	if !h.limiter.Unlimited() {
		// Wait at most half the ACK timeout; past that the sender is
		// told to send again later (AE) rather than to give up.
		wctx, cancel := context.WithTimeout(ctx, h.maxWait)
		err := h.limiter.Wait(wctx, src, 1)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return typ, h.retry(hd, ctx.Err())
			}
			return typ, h.ack(hd, hl7.AE, []hl7.Issue{{Code: hl7.CodeInternalError, Severity: hl7.SeverityError,
				Reason: validate.RateLimited, Message: fmt.Sprintf("source %q exceeds its rate limit: send again later", src)}})
		}
	}
	oru := hd.Type == "ORU" && (hd.Trigger == "R01" || hd.Trigger == "")
	if !oru && hd.Type != "ADT" {
		code := hl7.CodeUnsupportedType
		if hd.Type == "ORU" {
			code = hl7.CodeUnsupportedEvent
		}
		return typ, h.refuse(ctx, hd, tenant, remote, raw, hl7.Issue{Segment: "MSH", Sequence: 1, Field: 9,
			Code: code, Severity: hl7.SeverityError, Reason: validate.UnsupportedMessage,
			Message: fmt.Sprintf("message type %s^%s is not taken: Vigil takes ORU^R01 and ADT", hd.Type, hd.Trigger)})
	}
	// A message sent again has the same control id: unique per tenant
	// and source (the samples contract), so that the filter can be warmed
	// up from the samples topic after a restart (warmDedupe).
	var key dedupe.Key
	if h.dedupe != nil {
		var buf [256]byte
		if oru {
			key = h.dedupe.Key(oruKey(buf[:0], tenant, hd.ControlID))
		} else {
			key = h.dedupe.Key(dedupe.MessageKey(buf[:0], "mllp", tenant+"\x00"+hd.Type, hd.ControlID))
		}
	}
	if h.dedupe != nil {
		release, err := h.claim(ctx, key)
		if err != nil {
			return typ, h.retry(hd, fmt.Errorf("waiting for an earlier copy of message %s: %w", hd.ControlID, err))
		}
		defer release()
	}
	if h.dedupe != nil && h.dedupe.ContainsKey(key) {
		h.m.duplicates.Inc()
		return typ, h.ack(hd, hl7.AA, []hl7.Issue{{Code: hl7.CodeDuplicateKey, Severity: hl7.SeverityInfo,
			Message: fmt.Sprintf("message %s was already accepted; not processed again", hd.ControlID)}})
	}
	var ack []byte
	var accepted bool
	if oru {
		ack, accepted = h.oru(ctx, m, hd, tenant, remote, raw)
	} else {
		ack, accepted = h.adt(ctx, m, hd, tenant, remote, raw)
	}
	if accepted && h.dedupe != nil {
		h.dedupe.AddKey(key)
	}
	return typ, ack
}

// claim makes the caller the only one handling the message of key: it
// waits (within ctx) while another copy of it is being handled, and returns
// the release to call once the outcome is recorded in h.dedupe. Without it
// the filter, which records a message only once Kafka acknowledged it,
// lets a copy re-sent during a slow publish through, and the message is
// published twice.
func (h *Handler) claim(ctx context.Context, key dedupe.Key) (release func(), err error) {
	for {
		h.inflightMu.Lock()
		busy, ok := h.inflight[key]
		if !ok {
			done := make(chan struct{})
			if h.inflight == nil {
				h.inflight = map[dedupe.Key]chan struct{}{}
			}
			h.inflight[key] = done
			h.inflightMu.Unlock()
			return func() {
				h.inflightMu.Lock()
				delete(h.inflight, key)
				h.inflightMu.Unlock()
				close(done)
			}, nil
		}
		h.inflightMu.Unlock()
		select {
		case <-busy:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// headerOnly reads what it can of the MSH of a message that failed to
// parse, so that the ACK still answers its sender and control id.
func headerOnly(raw []byte) hl7.Header {
	line := raw
	if i := bytes.IndexAny(line, "\r\n"); i >= 0 {
		// Skip leading line breaks, NULs and a byte order mark.
		j := 0
		for j < len(line) && (line[j] == '\r' || line[j] == '\n' || line[j] == 0) {
			j++
		}
		line = line[j:]
		if k := bytes.IndexAny(line, "\r\n"); k >= 0 {
			line = line[:k]
		}
	}
	m, err := hl7.Parse(line)
	if err != nil {
		return hl7.Header{}
	}
	return hl7.ReadHeader(m)
}

// refuse dead-letters the whole message and answers AR, or AE when the
// dead letter could not be written (the sender must then send it again).
func (h *Handler) refuse(ctx context.Context, hd hl7.Header, tenant, remote string, raw []byte, iss hl7.Issue) []byte {
	dl := &vigilv1.DeadLetter{Reason: string(iss.Reason), Message: iss.Message, Source: vigilv1.Source_SOURCE_MLLP,
		Origin: remote, Field: iss.Path(), Raw: append([]byte(nil), raw...), Tenant: tenant, MessageId: hd.ControlID,
		ContentType: hl7.ContentType}
	if err := h.pub.DeadLetter(ctx, []*vigilv1.DeadLetter{dl}); err != nil {
		return h.retry(hd, err)
	}
	return h.ack(hd, hl7.AR, []hl7.Issue{iss})
}

// retry answers AE for a failure that may pass, or AR with an internal
// error for one that will not.
func (h *Handler) retry(hd hl7.Header, err error) []byte {
	h.log.Warn("hl7 message not accepted", "control_id", hd.ControlID, "err", err)
	if err != nil && !publish.IsRetriable(err) {
		return h.ack(hd, hl7.AR, []hl7.Issue{{Code: hl7.CodeInternalError, Severity: hl7.SeverityError,
			Message: "Vigil cannot store this message: " + err.Error()}})
	}
	return h.ack(hd, hl7.AE, []hl7.Issue{{Code: hl7.CodeInternalError, Severity: hl7.SeverityError,
		Message: "Vigil could not store this message now (Kafka unavailable or busy): send it again"}})
}

func (h *Handler) oru(ctx context.Context, m *hl7.Message, hd hl7.Header, tenant, remote string, raw []byte) ([]byte, bool) {
	env := hl7.Env{Tenant: tenant, NowMs: h.clock.Now().UnixMilli(), Origin: remote}
	if h.binder != nil {
		env.Resolver = h.binder
	}
	res := h.dec.DecodeORU(m, env)
	accepted := res.Samples
	for _, w := range res.Waveforms {
		err := h.wave.Chunk(ctx, w.Chunk)
		var ce *waveform.ChunkError
		switch {
		case err == nil:
			h.m.waveforms.WithLabelValues("ok").Inc()
			accepted++
			continue
		case errors.As(err, &ce):
		default:
			return h.retry(hd, err), false
		}
		// Refused for its content: a dead letter, like a refused OBX.
		h.m.waveforms.WithLabelValues("refused").Inc()
		field := 5
		switch ce.Field {
		case "unit":
			field = 6
		case "metric":
			field = 3
		case "channel":
			field = 4
		}
		is := hl7.Issue{Segment: "OBX", Sequence: w.Sequence, Field: field, Code: hl7.CodeDataType, Severity: hl7.SeverityError,
			Reason: ce.Reason, Message: "waveform: " + ce.Error()}
		res.Issues = append(res.Issues, is)
		res.Letters = append(res.Letters, &vigilv1.DeadLetter{Reason: string(ce.Reason), Message: is.Message,
			Source: vigilv1.Source_SOURCE_MLLP, Origin: remote, Field: is.Path(), Raw: append([]byte(nil), w.Raw...),
			Tenant: tenant, Patient: w.Chunk.Patient, Device: w.Chunk.Device, MessageId: hd.ControlID, ContentType: hl7.ContentType})
	}
	// Refusals first: if Kafka then fails the samples, the sender's retry
	// duplicates dead letters at worst.
	if err := h.pub.DeadLetter(ctx, res.Letters); err != nil {
		return h.retry(hd, err), false
	}
	batches, keys := h.dropRepeats(res.Batches, hd.ControlID)
	if err := h.pub.Publish(ctx, batches); err != nil {
		return h.retry(hd, err), false
	}
	for _, k := range keys {
		h.repeats.AddKey(k)
	}
	if accepted == 0 && len(res.Issues) > 0 {
		return h.ack(hd, hl7.AR, res.Issues), false
	}
	for i := range res.Issues {
		res.Issues[i].Severity = hl7.SeverityWarning
	}
	return h.ack(hd, hl7.AA, res.Issues), true
}

func (h *Handler) adt(ctx context.Context, m *hl7.Message, hd hl7.Header, tenant, remote string, raw []byte) ([]byte, bool) {
	ev, iss := hl7.DecodeADT(m, hd.Trigger, h.dec.Zone, h.clock.Now().UnixMilli())
	if iss != nil {
		return h.refuse(ctx, hd, tenant, remote, raw, *iss), false
	}
	if ev == nil {
		// An ADT event that changes no binding (A05, A31...): taken.
		return h.ack(hd, hl7.AA, nil), true
	}
	if h.binder == nil {
		h.m.bindings.WithLabelValues("skipped").Inc()
		return h.ack(hd, hl7.AA, nil), true
	}
	ev.Tenant = tenant
	ev.SetBy = hd.SendingFacility + " ADT^" + hd.Trigger + " " + hd.ControlID
	if err := h.binder.ApplyADT(ctx, *ev); err != nil {
		var inv *binding.InvalidError
		if errors.As(err, &inv) {
			return h.refuse(ctx, hd, tenant, remote, raw, hl7.Issue{Segment: "PID", Sequence: 1, Field: 3,
				Code: hl7.CodeRequiredMissing, Severity: hl7.SeverityError, Reason: validate.MissingField,
				Message: "ADT^" + hd.Trigger + ": " + inv.Error()}), false
		}
		return h.retry(hd, fmt.Errorf("applying ADT^%s to the bindings: %w", hd.Trigger, err)), false
	}
	h.m.bindings.WithLabelValues(string(ev.Kind)).Inc()
	return h.ack(hd, hl7.AA, nil), true
}

// tooLarge answers a frame that exceeded the size bound: AR, and a dead
// letter with its first bytes (prefix).
func (h *Handler) tooLarge(ctx context.Context, remote string, prefix []byte, limit int) []byte {
	hd := headerOnly(prefix)
	iss := hl7.Issue{Code: hl7.CodeInternalError, Severity: hl7.SeverityError, Reason: validate.BodyTooLarge,
		Message: fmt.Sprintf("message exceeds %d bytes (mllp.max_message_bytes)", limit)}
	ack := h.refuse(ctx, hd, h.tenantOf(hd.SendingFacility), remote, prefix, iss)
	h.m.messages.WithLabelValues("too_large", string(ack[bytes.Index(ack, []byte("MSA|"))+4:][:2])).Inc()
	return ack
}

// oruKey is the duplicate-filter key of an ORU message: its tenant and
// control id (what its sample batches carry as tenant and message_id).
func oruKey(buf []byte, tenant, controlID string) []byte {
	return dedupe.MessageKey(buf, "mllp", tenant+"\x00ORU", controlID)
}

// observationKey is the duplicate-filter key of a published observation.
func observationKey(buf []byte, tenant, patient, device string, s *vigilv1.Sample) []byte {
	buf = append(buf, 'o', 0)
	for _, part := range []string{tenant, patient, device, s.Channel, s.Metric} {
		buf = append(append(buf, part...), 0)
	}
	buf = strconv.AppendInt(buf, s.EventTimeMs, 10)
	buf = append(buf, 0)
	return strconv.AppendUint(buf, math.Float64bits(s.Value), 16)
}

// dropRepeats removes the observations published before within the dedupe
// window (counted, logged at debug level) and returns the batches left and
// the keys to record once they are durable. The batches of res are
// modified in place.
func (h *Handler) dropRepeats(batches []*vigilv1.SampleBatch, controlID string) ([]*vigilv1.SampleBatch, []dedupe.Key) {
	if h.repeats == nil {
		return batches, nil
	}
	var keys []dedupe.Key
	var buf []byte
	dropped := 0
	out := batches[:0]
	for _, b := range batches {
		kept := b.Samples[:0]
		for _, smp := range b.Samples {
			buf = observationKey(buf[:0], b.Tenant, b.Patient, b.Device, smp)
			k := h.repeats.Key(buf)
			if h.repeats.ContainsKey(k) {
				dropped++
				continue
			}
			keys = append(keys, k)
			kept = append(kept, smp)
		}
		b.Samples = kept
		if len(kept) > 0 {
			out = append(out, b)
		}
	}
	if dropped > 0 {
		h.m.repeats.Add(float64(dropped))
		h.log.Debug("observations already published: not published again", "control_id", controlID, "repeated", dropped)
	}
	return out, keys
}
