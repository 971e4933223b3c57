package mqtt

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// TopicRoot is the first level of the topics the embedded broker ingests:
// vigil/<tenant>/<device>/samples.
const TopicRoot = "vigil"

// ContentType is recorded on the dead letters of MQTT payloads.
const ContentType = "application/json"

// verdict is what became of one PUBLISH.
type verdict int

const (
	// accepted: every sample is in Kafka; acknowledge.
	accepted verdict = iota
	// refused: some or all of it is on the dead-letter topic (what was
	// valid is in Kafka); it will never succeed, so acknowledge (MQTT 5:
	// with a failure reason code).
	refused
	// failed: Kafka did not acknowledge; nothing counts as accepted; do
	// not acknowledge, so the client sends it again.
	failed
)

// result is the verdict on one PUBLISH with what an MQTT 5 PUBACK says.
type result struct {
	verdict verdict
	// code is the MQTT 5 reason code of a refusal or failure (0x99 payload
	// format invalid, 0x90 topic name invalid, 0x80 unspecified error).
	code byte
	// reason is a human sentence for the PUBACK's reason string and logs.
	reason    string
	retriable bool
	samples   int
}

// ingester is the transport-independent part shared by the embedded broker
// and the external subscriber: topic → tenant/device, size bound, then the
// HTTP JSON core (httpjson.Handler.Accept). It is safe for concurrent use.
type ingester struct {
	core       *httpjson.Handler
	pub        httpjson.Publisher
	log        *slog.Logger
	clock      clock.Clock
	maxPayload int
	m          *metrics
}

type metrics struct {
	received *prometheus.CounterVec // mode, qos
	outcome  *prometheus.CounterVec // mode, qos, result
	puback   *prometheus.HistogramVec
	dropped  *prometheus.CounterVec // mode, why

	// The children of the hot path, resolved once (a label lookup per
	// message costs more than the increment): [mode][qos][verdict].
	recv   [2][3]prometheus.Counter
	out    [2][3][3]prometheus.Counter
	ackLat [2]prometheus.Observer
}

// Modes of ingest, the "mode" label.
const (
	modeEmbedded = iota
	modeExternal
)

var modeNames = [2]string{"embedded", "external"}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_mqtt_messages_received_total",
			Help: "MQTT PUBLISH messages received on ingest topics, by mode (embedded broker or external subscription) and QoS.",
		}, []string{"mode", "qos"}),
		outcome: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_mqtt_messages_total",
			Help: "MQTT PUBLISH messages processed, by mode, QoS and result: accepted (all samples in Kafka), refused (some or all dead-lettered), failed (Kafka did not acknowledge; not acknowledged to the client, which sends again).",
		}, []string{"mode", "qos", "result"}),
		puback: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vigil_mqtt_puback_seconds",
			Help:    "Time from receiving a QoS 1 PUBLISH to acknowledging it (PUBACK), which waits for Kafka.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 12),
		}, []string{"mode"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_mqtt_messages_not_acked_total",
			Help: "MQTT QoS 1 messages deliberately left unacknowledged (Kafka failure, shutting down), by mode and why; the client or broker delivers them again.",
		}, []string{"mode", "why"}),
	}
	if err := stage.Register(reg, "mqtt ingest metrics", m.received, m.outcome, m.puback, m.dropped); err != nil {
		return nil, err
	}
	for mode, mn := range modeNames {
		m.ackLat[mode] = m.puback.WithLabelValues(mn)
		for q, ql := range qosLabels {
			m.recv[mode][q] = m.received.WithLabelValues(mn, ql)
			for v, vl := range verdictLabels {
				m.out[mode][q][v] = m.outcome.WithLabelValues(mn, ql, vl)
			}
		}
	}
	return m, nil
}

// newIngester creates the JSON core with the rate limit and duplicate
// filter of cfg.Ingest (metrics labelled "mqtt"): over its rate limit a
// device is slowed down (its PUBACK and its next read wait), not refused.
// resolver, when not nil, gives samples without a patient the patient bound
// to their device.
func newIngester(cfg config.Config, deps stage.Deps, pub httpjson.Publisher, m *metrics, resolver httpjson.Resolver) (*ingester, error) {
	if n, ok := pub.(nower); ok {
		pub = nowPublisher{Publisher: pub, now: n}
	}
	core, err := httpjson.NewCore(cfg, deps, pub)
	if err != nil {
		return nil, fmt.Errorf("creating mqtt ingest: %w", err)
	}
	if err := core.UseLimits(cfg.Ingest, deps, "mqtt"); err != nil {
		return nil, fmt.Errorf("creating mqtt ingest: %w", err)
	}
	if resolver != nil {
		core.SetResolver(resolver)
	}
	return &ingester{core: core, pub: pub, log: deps.Log, clock: deps.Clock, maxPayload: cfg.MQTT.MaxPayloadBytes, m: m}, nil
}

// nower is a publisher that can send a call's records without lingering
// (publish.Publisher.PublishNow).
type nower interface {
	PublishNow(ctx context.Context, batches []*vigilv1.SampleBatch) error
}

// nowPublisher publishes through PublishNow: a lane's call already holds
// the messages of every client that published meanwhile, and the external
// subscriber waits for each message, so the producer's linger would only
// add latency.
type nowPublisher struct {
	httpjson.Publisher
	now nower
}

func (p nowPublisher) Publish(ctx context.Context, batches []*vigilv1.SampleBatch) error {
	return p.now.PublishNow(ctx, batches)
}

// parseTopic splits <root>/<tenant>/<device>/samples; root "" accepts any
// first level (external subscriptions choose their own).
func parseTopic(topic, root string) (tenant, device string, ok bool) {
	first, rest, ok1 := strings.Cut(topic, "/")
	tenant, rest, ok2 := strings.Cut(rest, "/")
	device, last, ok3 := strings.Cut(rest, "/")
	if !ok1 || !ok2 || !ok3 || last != "samples" || tenant == "" || device == "" || (root != "" && first != root) {
		return "", "", false
	}
	return tenant, device, true
}

var qosLabels = [3]string{"0", "1", "2"}

var verdictLabels = [3]string{accepted: "accepted", refused: "refused", failed: "failed"}

// handle ingests one PUBLISH of topic (already known to be an ingest topic
// or under TopicRoot) and blocks until Kafka acknowledged what it produced
// (or failed). payload is only read, until handle returns. origin names the
// sender for dead letters.
func (in *ingester) handle(ctx context.Context, mode int, topic string, payload []byte, qos byte, origin, root string) result {
	q := min(qos, 2)
	in.m.recv[mode][q].Inc()
	r := in.process(ctx, topic, payload, origin, root)
	in.m.out[mode][q][r.verdict].Inc()
	return r
}

func (in *ingester) process(ctx context.Context, topic string, payload []byte, origin, root string) result {
	meta, r, ok := in.check(ctx, topic, payload, origin, root)
	if !ok {
		return r
	}
	return verdictOf(in.core.Accept(ctx, payload, meta))
}

// check takes the tenant and device from topic and bounds the payload; ok
// false means the PUBLISH was refused (r, its dead letter published).
func (in *ingester) check(ctx context.Context, topic string, payload []byte, origin, root string) (meta httpjson.Meta, r result, ok bool) {
	tenant, device, ok := parseTopic(topic, root)
	if !ok {
		return meta, in.refuse(ctx, &vigilv1.DeadLetter{Reason: string(validate.UnsupportedMessage), Field: "topic",
			Message: fmt.Sprintf("topic %q is not %s/<tenant>/<device>/samples", clipTopic(topic), TopicRoot)},
			payload, origin, 0x90), false
	}
	rf := validate.CheckID(validate.FieldTenant, tenant, validate.MaxTenantLen)
	if rf == nil {
		rf = validate.CheckID(validate.FieldDevice, device, validate.MaxDeviceLen)
	}
	if rf != nil {
		return meta, in.refuse(ctx, &vigilv1.DeadLetter{Reason: string(rf.Reason), Field: "topic",
			Message: "topic " + clipTopic(topic) + ": " + rf.Message}, payload, origin, 0x90), false
	}
	if len(payload) > in.maxPayload {
		return meta, in.refuse(ctx, &vigilv1.DeadLetter{Reason: string(validate.BodyTooLarge), Field: "payload", Tenant: tenant, Device: device,
			Message: fmt.Sprintf("the payload is larger than %d bytes (%d); split it", in.maxPayload, len(payload))},
			payload, origin, 0x95), false
	}
	return httpjson.Meta{Source: vigilv1.Source_SOURCE_MQTT, Origin: origin, Tenant: tenant, Device: device, ContentType: ContentType}, result{}, true
}

// verdictOf turns the JSON core's outcome into the PUBLISH's verdict.
func verdictOf(o httpjson.Outcome) result {
	switch {
	case o.Err != nil:
		return result{verdict: failed, code: 0x80, reason: "kafka did not acknowledge: " + o.Err.Error(), retriable: o.Retriable}
	case o.Problem != nil:
		msg := o.Problem.Detail
		if len(o.Problem.Errors) > 0 {
			e := o.Problem.Errors[0]
			msg += "; first: " + e.Field + ": " + e.Message + " (" + e.Reason + ")"
		}
		return result{verdict: refused, code: 0x99, reason: msg, samples: o.Samples}
	}
	return result{verdict: accepted, samples: o.Samples}
}

// refuse dead-letters a PUBLISH refused before its payload was decoded.
func (in *ingester) refuse(ctx context.Context, dl *vigilv1.DeadLetter, payload []byte, origin string, code byte) result {
	dl.SchemaVersion = publish.SchemaVersion
	dl.Source = vigilv1.Source_SOURCE_MQTT
	dl.Origin = origin
	dl.ContentType = ContentType
	dl.RefusedTimeMs = in.clock.Now().UnixMilli()
	dl.Raw = payload
	if err := in.pub.DeadLetter(ctx, []*vigilv1.DeadLetter{dl}); err != nil {
		return result{verdict: failed, code: 0x80, reason: "kafka did not acknowledge the dead letter: " + err.Error(), retriable: publish.IsRetriable(err)}
	}
	return result{verdict: refused, code: code, reason: dl.Message}
}

func clipTopic(t string) string {
	if len(t) > 200 {
		return t[:200] + "…"
	}
	return t
}

// sinceSeconds is the PUBACK latency observed by both modes.
func sinceSeconds(t time.Time) float64 { return time.Since(t).Seconds() }

// drainGroup counts publishes in flight to Kafka and lets a stop wait for
// them; unlike sync.WaitGroup it can be waited on with a deadline.
type drainGroup struct {
	mu   sync.Mutex
	n    int
	zero chan struct{} // closed while n == 0; replaced when n leaves 0
}

func newDrainGroup() *drainGroup {
	z := make(chan struct{})
	close(z)
	return &drainGroup{zero: z}
}

func (d *drainGroup) add() {
	d.mu.Lock()
	if d.n == 0 {
		d.zero = make(chan struct{})
	}
	d.n++
	d.mu.Unlock()
}

func (d *drainGroup) done() {
	d.mu.Lock()
	d.n--
	if d.n == 0 {
		close(d.zero)
	}
	d.mu.Unlock()
}

// wait blocks until nothing is in flight or ctx ends.
func (d *drainGroup) wait(ctx context.Context) error {
	d.mu.Lock()
	z := d.zero
	d.mu.Unlock()
	select {
	case <-z:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for %s publishes in flight: %w", strconv.Itoa(d.count()), ctx.Err())
	}
}

func (d *drainGroup) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.n
}
