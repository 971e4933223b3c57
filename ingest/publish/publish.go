// Package publish is the Kafka side of every ingest path: a Publisher writes
// canonical sample batches to the samples topic and refusals to the
// dead-letter topic, and returns only once Kafka has acknowledged every
// record, so that an ingest path answers its sender (HTTP 2xx, HL7 AA, MQTT
// PUBACK) only for data that is durably in Kafka.
//
// One Publisher holds one franz-go client (idempotent producer, acks from all
// in-sync replicas) shared by every request goroutine. Its produce buffer is
// bounded by kafka.max_buffered_bytes: when Kafka is slower than the senders,
// Publish blocks (backpressure) until there is room or its time bound
// (kafka.produce_timeout) passes, and then fails with a retriable error.
//
// Delivery is at least once: when a call fails after part of its records
// were acknowledged (or on a timeout whose records land later), a retry by
// the sender can write some samples twice. Every sample carries
// (tenant, patient, device, metric, event time, channel, sequence) so that
// consumers and sinks de-duplicate.
package publish

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// SchemaVersion is the contract version written on batches and dead letters
// that do not set one.
const SchemaVersion = 1

// MaxRecordBytes bounds one record's value. A sample batch that encodes
// larger is split into several records (same header, consecutive samples),
// well below the producer's 1 MiB batch limit.
const MaxRecordBytes = 512 << 10

// ErrClosed is returned (wrapped, retriable) by calls after Close.
var ErrClosed = errors.New("publisher closed")

// Error is a failed publish. Retriable tells the caller whether the same call
// may succeed later (Kafka unavailable, timeout, shutting down: answer 503,
// HL7 AE, retry) or never will (record too large, not authorised: answer
// 500/AR and alert an operator).
type Error struct {
	// Op is what failed, e.g. "publishing 3 sample batches".
	Op        string
	Retriable bool
	Err       error
}

// Error returns "op: cause".
func (e *Error) Error() string { return e.Op + ": " + e.Err.Error() }

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// IsRetriable reports whether err (from Publish, DeadLetter or Ping) is
// worth retrying later. Errors that are not a *Error are judged by Classify.
func IsRetriable(err error) bool {
	var pe *Error
	if errors.As(err, &pe) {
		return pe.Retriable
	}
	return Classify(err)
}

// Classify reports whether a produce error is transient: timeouts, broker or
// network unavailability, full buffers, a closed client (process stopping)
// and Kafka errors marked retriable are; record too large, invalid records
// and authorisation failures are not.
func Classify(err error) bool {
	switch {
	case err == nil:
		return false
	case errors.Is(err, kerr.MessageTooLarge), errors.Is(err, kerr.RecordListTooLarge),
		errors.Is(err, kerr.InvalidRecord), errors.Is(err, kerr.CorruptMessage),
		errors.Is(err, kerr.InvalidTopicException), errors.Is(err, kerr.TopicAuthorizationFailed),
		errors.Is(err, kerr.ClusterAuthorizationFailed), errors.Is(err, kerr.TransactionalIDAuthorizationFailed),
		errors.Is(err, kerr.UnsupportedVersion), errors.Is(err, kerr.UnsupportedCompressionType):
		return false
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled),
		errors.Is(err, kgo.ErrRecordTimeout), errors.Is(err, kgo.ErrRecordRetries),
		errors.Is(err, kgo.ErrMaxBuffered), errors.Is(err, kgo.ErrClientClosed), errors.Is(err, ErrClosed),
		errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, net.ErrClosed):
		return true
	}
	var ke *kerr.Error
	if errors.As(err, &ke) {
		return ke.Retriable
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	// Anything else from the client (dial errors, broker gone) is about
	// reaching Kafka, not about the data.
	return true
}

// Publisher writes sample batches and dead letters to Kafka. It is safe for
// concurrent use by many goroutines. Create it with New; Close it once the
// ingest paths using it have stopped.
type Publisher struct {
	cl       *kgo.Client
	log      *slog.Logger
	clock    clock.Clock
	samples  string
	dead     string
	timeout  time.Duration
	rawLimit int

	m metrics

	mu       sync.Mutex
	closed   bool
	inflight sync.WaitGroup
	closeErr error
	doneOnce sync.Once
	done     chan struct{}
}

type metrics struct {
	accepted  *prometheus.CounterVec
	batches   *prometheus.CounterVec
	dead      *prometheus.CounterVec
	failures  *prometheus.CounterVec
	latency   prometheus.Histogram
	splitRecs prometheus.Counter

	// bySource caches the children of batches and accepted per source
	// (index: the Source value), created on first use so that only sources
	// seen are exported: resolving the label (and building it with
	// Source.Label) per record showed in profiles.
	bySource *[maxCachedSource + 1]atomic.Pointer[sourceCounters]
}

// maxCachedSource is the largest Source value whose counters are cached.
const maxCachedSource = 15

// sourceCounters are the per-record counters of one source.
type sourceCounters struct {
	batches, accepted prometheus.Counter
}

// source returns the counters of src.
func (m *metrics) source(src vigilv1.Source) *sourceCounters {
	if src < 0 || src > maxCachedSource {
		l := src.Label()
		return &sourceCounters{batches: m.batches.WithLabelValues(l), accepted: m.accepted.WithLabelValues(l)}
	}
	if c := m.bySource[src].Load(); c != nil {
		return c
	}
	l := src.Label()
	c := &sourceCounters{batches: m.batches.WithLabelValues(l), accepted: m.accepted.WithLabelValues(l)}
	m.bySource[src].Store(c) // a concurrent first use stores the same children
	return c
}

// New creates a Publisher for cfg (brokers, topics, produce timeout, buffer
// bound, dead-letter raw limit) and registers its metrics on deps.Metrics
// (re-using collectors already registered there by another Publisher). It
// does not contact Kafka; Ping does.
func New(cfg config.Config, deps stage.Deps) (*Publisher, error) {
	deps = deps.WithDefaults()
	if len(cfg.Kafka.Brokers) == 0 {
		return nil, fmt.Errorf("creating publisher: no kafka brokers configured")
	}
	if cfg.Kafka.ProduceTimeout <= 0 {
		return nil, fmt.Errorf("creating publisher: kafka.produce_timeout must be positive")
	}
	m, err := newMetrics(deps.Metrics)
	if err != nil {
		return nil, fmt.Errorf("registering publisher metrics: %w", err)
	}
	opts := append(bus.ClientOpts(cfg.Kafka, deps.Log),
		kgo.RequiredAcks(kgo.AllISRAcks()),
		// Records that could not even be sent within the produce
		// timeout fail, so a call never waits on a dead broker forever
		// (franz-go's floor for this timeout is 1s).
		kgo.RecordDeliveryTimeout(max(cfg.Kafka.ProduceTimeout, time.Second)),
		kgo.ProducerLinger(2*time.Millisecond),
	)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("creating kafka producer: %w", err)
	}
	return &Publisher{
		cl:       cl,
		log:      deps.Log,
		clock:    deps.Clock,
		samples:  cfg.Kafka.Topics.Samples,
		dead:     cfg.Kafka.Topics.DeadLetter,
		timeout:  cfg.Kafka.ProduceTimeout,
		rawLimit: cfg.Ingest.DeadLetterRawLimit,
		m:        m,
		done:     make(chan struct{}),
	}, nil
}

func newMetrics(reg prometheus.Registerer) (metrics, error) {
	m := metrics{bySource: new([maxCachedSource + 1]atomic.Pointer[sourceCounters])}
	var err error
	if m.accepted, err = register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_ingest_samples_accepted_total",
		Help: "Samples acknowledged by Kafka on the samples topic, by ingest source.",
	}, []string{"source"})); err != nil {
		return m, err
	}
	if m.batches, err = register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_ingest_batches_published_total",
		Help: "Sample batch records acknowledged by Kafka, by ingest source.",
	}, []string{"source"})); err != nil {
		return m, err
	}
	if m.dead, err = register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_ingest_deadletters_total",
		Help: "Dead letters acknowledged by Kafka, by ingest source and refusal reason.",
	}, []string{"source", "reason"})); err != nil {
		return m, err
	}
	if m.failures, err = register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_ingest_publish_failures_total",
		Help: "Publish calls that failed, by topic kind (samples, deadletter) and class (retriable, permanent).",
	}, []string{"kind", "class"})); err != nil {
		return m, err
	}
	if m.latency, err = register(reg, prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "vigil_ingest_publish_seconds",
		Help:    "Time from a publish call to Kafka acknowledging all of its records.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 12),
	})); err != nil {
		return m, err
	}
	if m.splitRecs, err = register(reg, prometheus.NewCounter(prometheus.CounterOpts{
		Name: "vigil_ingest_batches_split_total",
		Help: "Sample batches split into several records because they encoded larger than the record bound.",
	})); err != nil {
		return m, err
	}
	return m, nil
}

// register registers c, or returns the identical collector already there.
func register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing, nil
			}
		}
		return c, err
	}
	return c, nil
}

// Ping checks that a Kafka broker answers (for readiness checks).
func (p *Publisher) Ping(ctx context.Context) error {
	if err := p.cl.Ping(ctx); err != nil {
		return &Error{Op: "pinging kafka", Retriable: true, Err: err}
	}
	return nil
}

// begin registers an in-flight call, or reports that the Publisher is closed.
func (p *Publisher) begin() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.inflight.Add(1)
	return true
}

// Publish writes each batch as one record (a batch that encodes larger than
// MaxRecordBytes as several) to the samples topic, keyed "<tenant>/<patient>",
// and blocks until Kafka acknowledged all of them, ctx ends, or
// kafka.produce_timeout passes. It returns nil only when every record was
// acknowledged; otherwise a *Error saying whether a retry may help.
//
// Publish fills SchemaVersion (when 0) and IngestTimeMs (when 0, from the
// clock) on the batches; the caller must not modify the batches until Publish
// returns, and may reuse them afterwards (they are encoded before the call
// waits). Samples count as accepted in the metrics once acknowledged, under
// the batch's source.
func (p *Publisher) Publish(ctx context.Context, batches []*vigilv1.SampleBatch) error {
	return p.publish(ctx, batches, false)
}

// PublishNow is Publish for a caller that already gathered many senders'
// batches into one call (the MQTT ingest's lanes): its records are sent
// at once instead of waiting for the producer's linger (2 ms), which would
// only add latency to a batch already made; other callers' records keep
// lingering. It blocks, and treats batches, as Publish does.
func (p *Publisher) PublishNow(ctx context.Context, batches []*vigilv1.SampleBatch) error {
	return p.publish(ctx, batches, true)
}

func (p *Publisher) publish(ctx context.Context, batches []*vigilv1.SampleBatch, now bool) error {
	if len(batches) == 0 {
		return nil
	}
	if !p.begin() {
		return &Error{Op: publishOp(len(batches)), Retriable: true, Err: ErrClosed}
	}
	defer p.inflight.Done()
	start := time.Now()
	nowMs := p.clock.Now().UnixMilli()
	recs := make([]*kgo.Record, 0, len(batches))
	metas := make([]recMeta, 0, len(batches))
	for _, b := range batches {
		if b.SchemaVersion == 0 {
			b.SchemaVersion = SchemaVersion
		}
		if b.IngestTimeMs == 0 {
			b.IngestTimeMs = nowMs
		}
		var err error
		if recs, metas, err = p.appendBatch(recs, metas, b); err != nil {
			p.m.failures.WithLabelValues("samples", "permanent").Inc()
			return &Error{Op: publishOp(len(batches)), Retriable: false, Err: err}
		}
	}
	onAck := func(i int) {
		c := metas[i].counters
		c.batches.Inc()
		c.accepted.Add(float64(metas[i].samples))
	}
	var err error
	if now {
		err = p.produceNow(ctx, recs, onAck)
	} else {
		err = p.produce(ctx, recs, onAck)
	}
	p.m.latency.Observe(time.Since(start).Seconds())
	if err != nil {
		return p.fail("samples", publishOp(len(batches)), err)
	}
	return nil
}

// publishOp names a Publish call in errors (built only when one fails).
func publishOp(n int) string { return fmt.Sprintf("publishing %d sample batches", n) }

// recMeta is what the ack callback counts for one sample record.
type recMeta struct {
	counters *sourceCounters
	samples  int
}

// appendBatch encodes b into records (splitting it when too large).
func (p *Publisher) appendBatch(recs []*kgo.Record, metas []recMeta, b *vigilv1.SampleBatch) ([]*kgo.Record, []recMeta, error) {
	val, err := proto.Marshal(b)
	if err != nil {
		return recs, metas, fmt.Errorf("encoding sample batch of %s/%s: %w", b.Tenant, b.Patient, err)
	}
	if len(val) > MaxRecordBytes && len(b.Samples) > 1 {
		p.m.splitRecs.Inc()
		half := len(b.Samples) / 2
		first := shallowHeader(b)
		first.Samples = b.Samples[:half]
		second := shallowHeader(b)
		second.Samples = b.Samples[half:]
		if recs, metas, err = p.appendBatch(recs, metas, first); err != nil {
			return recs, metas, err
		}
		return p.appendBatch(recs, metas, second)
	}
	if len(val) > MaxRecordBytes {
		return recs, metas, fmt.Errorf("encoding sample batch of %s/%s: one sample encodes to %d bytes (at most %d): %w",
			b.Tenant, b.Patient, len(val), MaxRecordBytes, kerr.MessageTooLarge)
	}
	recs = append(recs, &kgo.Record{Topic: p.samples, Key: bus.PatientKey(b.Tenant, b.Patient), Value: val})
	return recs, append(metas, recMeta{counters: p.m.source(b.Source), samples: len(b.Samples)}), nil
}

// shallowHeader copies b's header fields (not its samples).
func shallowHeader(b *vigilv1.SampleBatch) *vigilv1.SampleBatch {
	return &vigilv1.SampleBatch{SchemaVersion: b.SchemaVersion, Tenant: b.Tenant, Patient: b.Patient,
		Device: b.Device, Source: b.Source, IngestTimeMs: b.IngestTimeMs, MessageId: b.MessageId, Location: b.Location}
}

// DeadLetter writes each letter as one record to the dead-letter topic, keyed
// by its source name, and blocks like Publish until all are acknowledged. It
// truncates Raw to ingest.deadletter_raw_limit (setting RawSize and
// RawTruncated), and fills SchemaVersion and RefusedTimeMs when 0; the caller
// must not modify the letters until it returns.
func (p *Publisher) DeadLetter(ctx context.Context, letters []*vigilv1.DeadLetter) error {
	if len(letters) == 0 {
		return nil
	}
	op := fmt.Sprintf("publishing %d dead letters", len(letters))
	if !p.begin() {
		return &Error{Op: op, Retriable: true, Err: ErrClosed}
	}
	defer p.inflight.Done()
	start := time.Now()
	now := p.clock.Now().UnixMilli()
	recs := make([]*kgo.Record, 0, len(letters))
	for _, l := range letters {
		if l.SchemaVersion == 0 {
			l.SchemaVersion = SchemaVersion
		}
		if l.RefusedTimeMs == 0 {
			l.RefusedTimeMs = now
		}
		TruncateRaw(l, p.rawLimit)
		val, err := proto.Marshal(l)
		if err != nil {
			p.m.failures.WithLabelValues("deadletter", "permanent").Inc()
			return &Error{Op: op, Err: fmt.Errorf("encoding dead letter: %w", err)}
		}
		recs = append(recs, &kgo.Record{Topic: p.dead, Key: []byte(l.Source.Label()), Value: val})
	}
	onAck := func(i int) {
		p.m.dead.WithLabelValues(letters[i].Source.Label(), letters[i].Reason).Inc()
	}
	err := p.produce(ctx, recs, onAck)
	p.m.latency.Observe(time.Since(start).Seconds())
	if err != nil {
		return p.fail("deadletter", op, err)
	}
	return nil
}

// TruncateRaw bounds l.Raw to limit bytes (limit 0 drops it), recording the
// original size in RawSize (unless already set) and RawTruncated.
func TruncateRaw(l *vigilv1.DeadLetter, limit int) {
	if l.RawSize == 0 {
		l.RawSize = uint64(len(l.Raw))
	}
	if len(l.Raw) > limit {
		l.Raw = l.Raw[:limit:limit]
		l.RawTruncated = true
	}
	if uint64(len(l.Raw)) < l.RawSize {
		l.RawTruncated = true
	}
}

func (p *Publisher) fail(kind, op string, err error) error {
	retriable := Classify(err)
	class := "permanent"
	if retriable {
		class = "retriable"
	}
	p.m.failures.WithLabelValues(kind, class).Inc()
	p.log.Warn("publish failed", "op", op, "retriable", retriable, "err", err)
	return &Error{Op: op, Retriable: retriable, Err: err}
}

// produce sends recs and waits until every promise fired, ctx ended or the
// produce timeout passed. onAck(i) runs (on the client's promise goroutine)
// for each acknowledged record recs[i].
//
// Records carry a background context: a caller giving up (an HTTP client
// disconnecting) must not cancel the batch it shares with other callers'
// records; the client's record delivery timeout bounds them instead.
func (p *Publisher) produce(ctx context.Context, recs []*kgo.Record, onAck func(i int)) error {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	var (
		pending  atomic.Int64
		errMu    sync.Mutex
		firstErr error
		all      = make(chan struct{})
	)
	pending.Store(int64(len(recs)))
	for i, r := range recs {
		r.Context = context.Background()
		p.cl.Produce(ctx, r, func(_ *kgo.Record, err error) {
			if err != nil {
				errMu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				errMu.Unlock()
			} else {
				onAck(i)
			}
			if pending.Add(-1) == 0 {
				close(all)
			}
		})
	}
	select {
	case <-all:
	case <-ctx.Done():
		select {
		case <-all: // acknowledged just in time
		default:
			// Records still in flight may yet land; the sender's retry
			// may then duplicate them (consumers de-duplicate).
			return fmt.Errorf("waiting for kafka acknowledgement of %d records: %w", pending.Load(), ctx.Err())
		}
	}
	errMu.Lock()
	defer errMu.Unlock()
	return firstErr
}

// produceNow is produce without the producer's linger: kgo's ProduceSync
// sends the partitions it produced to at once. ProduceSync waits for every
// record whatever ctx does, so it runs on its own goroutine (one per call,
// which carries a whole batch) and the call returns when ctx ends or the
// produce timeout passes, as produce does; the goroutine ends when the
// records' delivery timeout settles them, and counts what was acknowledged.
func (p *Publisher) produceNow(ctx context.Context, recs []*kgo.Record, onAck func(i int)) error {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	for _, r := range recs {
		r.Context = context.Background() // see produce
	}
	done := make(chan error, 1)
	go func() {
		res := p.cl.ProduceSync(ctx, recs...)
		if err := res.FirstErr(); err == nil {
			for i := range recs {
				onAck(i)
			}
			done <- nil
			return
		}
		// Results come in completion order: find each one's index.
		at := make(map[*kgo.Record]int, len(recs))
		for i, r := range recs {
			at[r] = i
		}
		var first error
		for _, r := range res {
			if r.Err == nil {
				onAck(at[r.Record])
			} else if first == nil {
				first = r.Err
			}
		}
		done <- first
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		select {
		case err := <-done: // acknowledged just in time
			return err
		default:
			return fmt.Errorf("waiting for kafka acknowledgement of %d records: %w", len(recs), ctx.Err())
		}
	}
}

// Close waits (within ctx) for in-flight calls, flushes what is buffered
// (within ctx and the produce timeout) and closes the client. Calls made after Close fail with ErrClosed. It is
// idempotent and safe to call concurrently; later calls return the first
// call's result once it is done.
func (p *Publisher) Close(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		select {
		case <-p.done:
		case <-ctx.Done():
			return ctx.Err()
		}
		return p.closeErr
	}
	p.closed = true
	p.mu.Unlock()
	defer p.doneOnce.Do(func() { close(p.done) })

	waited := make(chan struct{})
	go func() { p.inflight.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-ctx.Done():
		p.log.Warn("closing publisher: in-flight publishes did not finish in time")
	}
	// Every call waiting on the buffered records has given up after the
	// produce timeout; so does the flush (an idempotent producer never
	// drops records whose fate it does not know, so against a vanished
	// broker Flush alone could wait forever).
	fctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	if err := p.cl.Flush(fctx); err != nil {
		p.closeErr = fmt.Errorf("flushing kafka producer: %w", err)
		p.log.Warn("closing publisher: records not flushed", "err", err)
	}
	p.cl.Close()
	return p.closeErr
}
