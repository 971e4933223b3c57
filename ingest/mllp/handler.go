package mllp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/binding"
	"github.com/vigilhealth/vigil/ingest/hl7"
	"github.com/vigilhealth/vigil/ingest/mapping"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/ingest/waveform"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
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
// satisfies it). Resolve must not block on I/O; Bind, Release
// and ReleasePatient block until the change is durable and return errors
// that publish.IsRetriable classifies. It must be safe for concurrent use.
type Binder interface {
	hl7.Resolver
	Bind(ctx context.Context, b binding.Binding) error
	Release(ctx context.Context, tenant, device string, atMs int64, source string) error
	ReleasePatient(ctx context.Context, tenant, patient string, atMs int64, source string) error
}

// Handler answers one HL7 v2 message at a time: it parses it, publishes
// what it yields, and returns the ACK. It is what the MLLP server runs for
// every frame, and is safe for concurrent use.
type Handler struct {
	pub      Publisher
	dec      *hl7.Decoder
	binder   Binder
	wave     waveform.Sink
	log      *slog.Logger
	clock    clock.Clock
	tenant   string
	tenants  map[string]string
	dedupe   *dedupe
	limiter  *limiter
	maxWait  time.Duration
	timeout  time.Duration
	ackSeq   atomic.Uint64
	ackStamp string

	m *handlerMetrics
}

type handlerMetrics struct {
	messages   *prometheus.CounterVec
	duplicates prometheus.Counter
	evicted    prometheus.Counter
	limited    prometheus.Counter
	limitWait  prometheus.Counter
	srcEvicted prometheus.Counter
	bindings   *prometheus.CounterVec
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
		evicted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_mllp_dedupe_evicted_total",
			Help: "Control ids forgotten before the end of the dedupe window because mllp.dedupe_size was reached.",
		}),
		limited: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_mllp_rate_limited_total",
			Help: "Messages whose ACK was delayed by the per-source rate limit.",
		}),
		limitWait: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_mllp_rate_limit_wait_seconds_total",
			Help: "Time ACKs were held back by the per-source rate limit.",
		}),
		srcEvicted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_mllp_rate_limit_sources_evicted_total",
			Help: "Rate-limit buckets forgotten because too many sources were tracked.",
		}),
		bindings: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_mllp_binding_changes_total",
			Help: "Device/bed binding changes made from ADT messages, by kind (bind, release, release_patient; skipped when no binding store is configured).",
		}, []string{"kind"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "vigil_mllp_ack_seconds",
			Help:    "Time from a whole frame read to its ACK being ready, Kafka acknowledgement included.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 12),
		}),
	}
}

func (m *handlerMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.messages, m.duplicates, m.evicted, m.limited, m.limitWait, m.srcEvicted, m.bindings, m.latency}
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
	h.dedupe = newDedupe(cfg.MLLP.DedupeWindow, cfg.MLLP.DedupeSize, m.evicted.Inc)
	h.limiter = newLimiter(cfg.MLLP.RateLimit, cfg.MLLP.RateBurst, m.srcEvicted.Inc)
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
	now := h.clock.Now()
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
	if wait := h.limiter.Reserve(src, now); wait > 0 {
		if wait > h.maxWait {
			h.limiter.Refund(src)
			return typ, h.ack(hd, hl7.AE, []hl7.Issue{{Code: hl7.CodeInternalError, Severity: hl7.SeverityError,
				Reason: validate.RateLimited, Message: fmt.Sprintf("source %q exceeds its rate limit: send again later", src)}})
		}
		h.m.limited.Inc()
		h.m.limitWait.Add(wait.Seconds())
		if !sleep(ctx, wait) {
			return typ, h.retry(hd, ctx.Err())
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
	// A message sent again has the same control id, sender and type.
	key := tenant + "\x00" + hd.SendingApp + "\x00" + hd.SendingFacility + "\x00" + hd.Type + "^" + hd.Trigger + "\x00" + hd.ControlID
	if h.dedupe.Seen(key, now) {
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
	if accepted {
		h.dedupe.Add(key, now)
	}
	return typ, ack
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
	for _, c := range res.Chunks {
		if err := h.wave.Chunk(ctx, c); err != nil {
			return h.retry(hd, err), false
		}
	}
	// Refusals first: if Kafka then fails the samples, the sender's retry
	// duplicates dead letters at worst.
	if err := h.pub.DeadLetter(ctx, res.Letters); err != nil {
		return h.retry(hd, err), false
	}
	if err := h.pub.Publish(ctx, res.Batches); err != nil {
		return h.retry(hd, err), false
	}
	if res.Samples == 0 && len(res.Chunks) == 0 && len(res.Issues) > 0 {
		return h.ack(hd, hl7.AR, res.Issues), false
	}
	for i := range res.Issues {
		res.Issues[i].Severity = hl7.SeverityWarning
	}
	return h.ack(hd, hl7.AA, res.Issues), true
}

func (h *Handler) adt(ctx context.Context, m *hl7.Message, hd hl7.Header, tenant, remote string, raw []byte) ([]byte, bool) {
	ops, iss := hl7.DecodeADT(m, hd.Trigger, h.dec.Zone, h.clock.Now().UnixMilli())
	if iss != nil {
		return h.refuse(ctx, hd, tenant, remote, raw, *iss), false
	}
	setBy := hd.SendingFacility + " ADT^" + hd.Trigger + " " + hd.ControlID
	for _, op := range ops {
		if h.binder == nil {
			h.m.bindings.WithLabelValues("skipped").Inc()
			continue
		}
		var err error
		switch op.Kind {
		case hl7.OpBind:
			err = h.binder.Bind(ctx, binding.Binding{Tenant: tenant, Device: op.Location, Patient: op.Patient,
				FromMs: op.AtMs, Source: binding.SourceADT, SetBy: setBy})
		case hl7.OpRelease:
			err = h.binder.Release(ctx, tenant, op.Location, op.AtMs, binding.SourceADT)
		case hl7.OpReleasePatient:
			err = h.binder.ReleasePatient(ctx, tenant, op.Patient, op.AtMs, binding.SourceADT)
		}
		if err != nil {
			return h.retry(hd, fmt.Errorf("changing binding (%s %s): %w", op.Kind, op.Location, err)), false
		}
		h.m.bindings.WithLabelValues(op.Kind.String()).Inc()
	}
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
