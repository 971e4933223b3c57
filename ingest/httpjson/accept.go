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
	if len(bodies) == 1 {
		return []Outcome{h.accept(ctx, bodies[0], metas[0], now)}
	}
	ps := make([]Pending, len(bodies))
	for i, data := range bodies {
		ps[i] = h.prepareAt(ctx, data, metas[i], now)
	}
	return h.Commit(ctx, ps, make([]Outcome, 0, len(bodies)))
}

// Pending is a body that Handler.Prepare decoded and validated, waiting for
// Handler.Commit to publish it (or already answered, when it was refused as
// a whole or rate limited). It holds a pooled decoder whose samples alias
// the body, so the body must stay unmodified until Commit or Release, and
// exactly one of them must be called (on one copy of the value). It is not
// safe for concurrent use.
type Pending struct {
	d    *decoder // nil when done
	pr   prepared
	meta Meta
	done bool
}

// Prepare is the part of Accept before Kafka: it decodes and validates body
// for Commit. It blocks while the sender is over its rate limit (sources
// other than HTTP are slowed down, not refused) and, for a body refused as a
// whole, until its dead letter is acknowledged (that body is then already
// answered: Commit returns its outcome without publishing). It lets a
// transport decode on each connection's goroutine and publish the bodies of
// many senders in one Kafka call. Safe for concurrent use.
func (h *Handler) Prepare(ctx context.Context, body []byte, m Meta) Pending {
	return h.prepareAt(ctx, body, m, h.clock.Now().UnixMilli())
}

func (h *Handler) prepareAt(ctx context.Context, body []byte, m Meta, now int64) Pending {
	d := h.pool.Get().(*decoder)
	pr, done := h.prepare(ctx, d, body, m, now)
	if done {
		h.putDecoder(d)
		d = nil
	}
	return Pending{d: d, pr: pr, meta: m, done: done}
}

// Release gives back what p holds without publishing it (its sender went
// away). p must not be used afterwards.
func (h *Handler) Release(p *Pending) {
	if p.d != nil {
		h.putDecoder(p.d)
		p.d = nil
	}
}

func (h *Handler) putDecoder(d *decoder) {
	d.release()
	h.pool.Put(d)
}

// Commit publishes the dead letters of every pending body of ps in one call,
// then their samples in one call, in the order of ps (a sender's samples
// stay in order on their partition when its bodies are in order in ps), and
// appends the outcome of each ps[i] to outs, in order. It blocks until Kafka
// acknowledged (or failed: every body that reached the shared publish fails
// with the same error, as in AcceptBatch) and then releases every ps[i].
// The bodies of ps may be of different senders. Safe for concurrent use.
func (h *Handler) Commit(ctx context.Context, ps []Pending, outs []Outcome) []Outcome {
	var (
		batches []*vigilv1.SampleBatch
		letters []*vigilv1.DeadLetter
		n       int
	)
	for i := range ps {
		if !ps[i].done {
			n++
			batches = append(batches, ps[i].pr.batches...)
			letters = append(letters, ps[i].pr.letters...)
		}
	}
	var err error
	if n > 0 {
		// Refusals first, as in Accept.
		err = h.pub.DeadLetter(ctx, letters)
		if err == nil {
			err = h.pub.Publish(ctx, batches)
		}
	}
	for i := range ps {
		p := &ps[i]
		switch {
		case p.done:
			outs = append(outs, p.pr.o)
		case err != nil:
			outs = append(outs, h.failed(p.pr.o, err))
		default:
			outs = append(outs, h.answered(p.pr, p.meta))
			h.rememberPublished(p.d)
		}
		h.Release(p)
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
