package httpjson

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Meta describes where a body given to Handler.Accept came from.
type Meta struct {
	// Source is the ingest path stamped on batches and dead letters
	// (SOURCE_HTTP when unspecified).
	Source vigilv1.Source
	// Origin is the sender, for dead letters and logs: a remote address,
	// an MQTT client id and topic.
	Origin string
	// Tenant, when set, is the tenant the transport authenticated (e.g. the
	// <tenant> of an MQTT topic): it is the default tenant of the body, and
	// a body or sample naming another tenant is refused (reason
	// invalid_id on field tenant).
	Tenant string
	// Device, when set, is the default device when the body names none.
	Device string
	// ContentType is recorded on dead letters; "application/json" when
	// empty.
	ContentType string
	// MessageID is the message id used when the body has none; when both
	// are empty a random one is generated, prefixed with the source label.
	MessageID string
}

// Outcome is what became of one body given to Handler.Accept.
type Outcome struct {
	// Samples counts the samples decoded from the body (0 when the body
	// was refused as a whole).
	Samples int
	// Accepted samples are in Kafka; Rejected ones are on the dead-letter
	// topic. Both are 0 when Err is set.
	Accepted, Rejected int
	// MessageID is the body's message id (given or generated); empty when
	// the body was refused before it was read.
	MessageID string
	// Problem is nil when every sample was accepted; else it says what was
	// refused, as the HTTP answer would (Status 400 or 413; Accepted > 0
	// means partial acceptance; Reason set means the body was refused as a
	// whole). Everything it names is on the dead-letter topic.
	Problem *Problem
	// Err is set when Kafka did not acknowledge: nothing of the body counts
	// as accepted, and Problem is nil. Retriable says whether sending the
	// same body again may succeed (publish.IsRetriable).
	Err       error
	Retriable bool
	// RetryAfter, when set, is when the sender may send again: the body
	// was over its source's rate limit (Problem.Status 429) and nothing
	// of it was accepted or dead-lettered.
	RetryAfter time.Duration
}

// NewCore creates a Handler for use through Accept only, by transports
// other than HTTP (MQTT): like New, but it registers no HTTP metrics, so
// several may share one registry with the HTTP handler.
func NewCore(cfg config.Config, deps stage.Deps, pub Publisher) (*Handler, error) {
	return newHandler(cfg, deps.WithDefaults(), pub)
}

// Accept decodes body (the JSON of POST /v1/samples, see the package
// documentation), validates it, writes the accepted samples to
// vigil.samples.v1 and the refused ones to vigil.deadletter.v1, and returns
// only after Kafka acknowledged both (or failed: Outcome.Err). It blocks on
// Kafka (backpressure) until ctx ends. It is safe for concurrent use; body
// is only read, and may be reused by the caller once Accept returns. The
// caller bounds the size of body.
func (h *Handler) Accept(ctx context.Context, body []byte, m Meta) Outcome {
	return h.accept(ctx, body, m, h.clock.Now().UnixMilli())
}

func (h *Handler) accept(ctx context.Context, data []byte, m Meta, now int64) Outcome {
	d := h.pool.Get().(*decoder)
	defer func() {
		d.release()
		h.pool.Put(d)
	}()
	pr, done := h.prepare(ctx, d, data, m, now)
	if done {
		return pr.o
	}
	// Refusals first: if Kafka then fails the samples, the sender's retry
	// duplicates dead letters at worst, and a refusal is only ever answered
	// with its dead letters acknowledged.
	if err := h.pub.DeadLetter(ctx, pr.letters); err != nil {
		return h.failed(pr.o, err)
	}
	if err := h.pub.Publish(ctx, pr.batches); err != nil {
		return h.failed(pr.o, err)
	}
	h.rememberPublished(d)
	return h.answered(pr, m)
}

// AcceptBatch is Accept for several bodies of one sender at once (e.g. the
// MQTT messages one client sent without waiting for each PUBACK), in order:
// each body is decoded and validated as by Accept, then the dead letters of
// all of them are published in one call and the samples of all of them in
// one call (in the bodies' order, so a device's samples stay in order on
// their partition), so a pipelining sender costs one Kafka round trip per
// batch instead of one per body. outs[i] is the outcome of bodies[i] with
// metas[i]; when Kafka does not acknowledge, every body that reached the
// shared publish fails with the same error. A body refused as a whole is
// answered (and its dead letter published) on its own. It blocks like
// Accept and is safe for concurrent use; the bodies are only read.
func (h *Handler) AcceptBatch(ctx context.Context, bodies [][]byte, metas []Meta) []Outcome {
	now := h.clock.Now().UnixMilli()
	outs := make([]Outcome, len(bodies))
	if len(bodies) == 1 {
		outs[0] = h.accept(ctx, bodies[0], metas[0], now)
		return outs
	}
	type item struct {
		i  int
		pr prepared
	}
	var (
		items   []item
		decs    []*decoder
		batches []*vigilv1.SampleBatch
		letters []*vigilv1.DeadLetter
	)
	defer func() {
		for _, d := range decs {
			d.release()
			h.pool.Put(d)
		}
	}()
	for i, data := range bodies {
		d := h.pool.Get().(*decoder)
		decs = append(decs, d)
		pr, done := h.prepare(ctx, d, data, metas[i], now)
		if done {
			outs[i] = pr.o
			continue
		}
		items = append(items, item{i, pr})
		batches = append(batches, pr.batches...)
		letters = append(letters, pr.letters...)
	}
	err := h.pub.DeadLetter(ctx, letters)
	if err == nil {
		err = h.pub.Publish(ctx, batches)
	}
	for _, it := range items {
		if err != nil {
			outs[it.i] = h.failed(it.pr.o, err)
			continue
		}
		outs[it.i] = h.answered(it.pr, metas[it.i])
	}
	if err == nil {
		for _, d := range decs {
			h.rememberPublished(d)
		}
	}
	return outs
}

// prepared is a body decoded and validated, ready to publish.
type prepared struct {
	o        Outcome
	batches  []*vigilv1.SampleBatch
	letters  []*vigilv1.DeadLetter
	problems []ProblemError
	samples  int
}

// prepare decodes and validates data with d (which must stay alive until
// the batches are published). done reports that pr.o is already the answer
// (the body was refused as a whole, its dead letter published, or it was
// rate limited).
func (h *Handler) prepare(ctx context.Context, d *decoder, data []byte, m Meta, now int64) (pr prepared, done bool) {
	b, berr := d.decode(data, h.maxSamples)
	if berr != nil {
		return prepared{o: h.refuseBody(ctx, berr, data, m, 0, now)}, true
	}
	msgID := string(b.messageID.b)
	if rf := validate.CheckID("message_id", msgID, MaxMessageIDLen); rf != nil {
		o := h.refuseBody(ctx, &bodyError{status: statusBadRequest, reason: rf.Reason, field: rf.Field, message: rf.Message, offset: -1}, data, m, 0, now)
		o.Samples = len(b.samples)
		return prepared{o: o}, true
	}
	if msgID == "" {
		msgID = m.MessageID
	}
	if msgID == "" {
		msgID = newMessageID(m.source())
	}
	if lo, stop := h.limitRate(ctx, b, &m, msgID); stop {
		return prepared{o: lo}, true
	}
	pr.o = Outcome{Samples: len(b.samples), MessageID: msgID}
	pr.samples = len(b.samples)
	pr.batches, pr.letters, pr.problems = h.validate(b, m, msgID, now)
	pr.batches = h.dropDuplicates(pr.batches, m.source(), d)
	return pr, false
}

// answered is the outcome of a prepared body once Kafka acknowledged it.
func (h *Handler) answered(pr prepared, m Meta) Outcome {
	o, letters := pr.o, pr.letters
	accepted := pr.samples - len(letters)
	o.Accepted, o.Rejected = accepted, len(letters)
	if len(letters) == 0 {
		return o
	}
	h.log.Debug("samples refused", "accepted", accepted, "rejected", len(letters), "message_id", o.MessageID, "origin", m.Origin)
	p := &Problem{Type: problemType("invalid-samples"), Title: "Some samples were refused",
		Status: statusBadRequest, MessageID: o.MessageID, Accepted: accepted, Rejected: len(letters), Errors: pr.problems,
		ErrorsTruncated: len(letters) > len(pr.problems)}
	if accepted > 0 {
		p.Detail = fmt.Sprintf("%d of %d samples were refused and sent to the dead-letter topic; the other %d were accepted and must not be sent again",
			len(letters), pr.samples, accepted)
	} else {
		p.Detail = fmt.Sprintf("all %d samples were refused and sent to the dead-letter topic", len(letters))
	}
	o.Problem = p
	return o
}

// failed records a Kafka failure on o: nothing counts as accepted.
func (h *Handler) failed(o Outcome, err error) Outcome {
	o.Accepted, o.Rejected, o.Problem = 0, 0, nil
	o.Err, o.Retriable = err, publish.IsRetriable(err)
	if !o.Retriable && !errors.Is(err, context.Canceled) {
		h.log.Error("publishing failed permanently", "err", err, "message_id", o.MessageID)
	}
	return o
}

func (m *Meta) source() vigilv1.Source {
	if m.Source == vigilv1.Source_SOURCE_UNSPECIFIED {
		return vigilv1.Source_SOURCE_HTTP
	}
	return m.Source
}

func (m *Meta) contentType() string {
	if m.ContentType == "" {
		return "application/json"
	}
	return m.ContentType
}

// registerHTTP registers the HTTP handler's metrics.
func (h *Handler) registerHTTP(reg prometheus.Registerer) error {
	return stage.Register(reg, "http ingest metrics", h.requests, h.received, h.duration)
}
