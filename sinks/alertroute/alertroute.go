// Package alertroute is the alert routes stage: it consumes the alert
// lifecycle events of vigil.alerts.v1 in its own consumer group
// (alerts.routes.group), delivers them to the configured webhooks and
// exports the alert-burden metrics (see burden.go).
//
// The Kafka topic is always a route: every event is there whether or not a
// webhook takes it, and any consumer may read it. Webhooks get a POST of the
// event as protobuf JSON, signed with HMAC-SHA256 (see Sign and Verify),
// with the event_id as Idempotency-Key. Delivery is at-least-once: an
// attempt that fails with a 5xx, 408, 429, a timeout or a connection error
// is retried with jittered exponential backoff up to
// alerts.routes.max_attempts; another 4xx is permanent. An event whose last
// attempt failed (or that was refused permanently) goes to
// vigil.deadletter.v1 with reason webhook_failed, naming the route, the
// status and the last error. Offsets are committed only once an event was
// delivered to every route that takes it or dead-lettered there, so a crash
// or restart delivers again what was not finished; receivers de-duplicate
// on the idempotency key.
//
// Each route has its own bounded queue (alerts.routes.queue_size) and
// alerts.routes.in_flight workers, so a slow webhook delays only its own
// events. When a route's queue stays full for alerts.routes.queue_wait the
// event is dead-lettered for that route with reason webhook_overflow
// (counted in vigil_alertroute_overflow_total) rather than stalling the
// other routes and the burden metrics.
package alertroute

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Dead-letter reasons of the stage.
const (
	// ReasonWebhookFailed: the last attempt failed, or the webhook refused
	// the event permanently (a 4xx other than 408/429).
	ReasonWebhookFailed = "webhook_failed"
	// ReasonWebhookOverflow: the route's queue stayed full for
	// alerts.routes.queue_wait.
	ReasonWebhookOverflow = "webhook_overflow"
	// ReasonUndecodable: the alert-topic record is not an AlertEvent.
	ReasonUndecodable = "undecodable_record"
)

// deadLetterKey keys the stage's dead letters (the topic is keyed by source).
var deadLetterKey = []byte("alertroute")

// jsonBody renders the webhook body: proto field names, like the
// explanation column in ClickHouse.
var jsonBody = protojson.MarshalOptions{UseProtoNames: true}

// Stage is the alert routes stage. Run must be called at most once; Close
// is idempotent and may be called after Run returned or instead of it.
// Burden reads metrics; nothing else of a Stage is safe for use from other
// goroutines.
type Stage struct {
	cfg    config.Config
	rc     config.AlertsRoutes
	log    *slog.Logger
	clock  clock.Clock
	met    *metrics
	burden *Burden
	cl     *kgo.Client
	routes []*route

	// mu guards parts (the poll loop, the workers' completions are
	// lock-free; the rebalance callbacks run on franz-go's goroutine).
	mu sync.Mutex
	// parts holds, per partition, the records read and not yet committed,
	// in offset order.
	parts map[topicPartition]*partition
	// wake is signalled (without blocking) when a record finished.
	wake chan struct{}

	stopWorkers context.CancelFunc
	closing     atomic.Bool
	closeOnce   sync.Once
	closeErr    error
}

type topicPartition struct {
	topic     string
	partition int32
}

// partition is the FIFO of one partition's uncommitted records; commit is
// the next offset to commit (every record before it is finished), -1 when
// nothing new is committable.
type partition struct {
	q      []*pending
	commit kgo.EpochOffset
	dirty  bool
}

// pending is one record: left counts the routes that have not finished
// it, plus one while dispatch is still queuing it. abandoned is set when
// dispatch stopped at shutdown before queuing it everywhere (it can then
// never finish here and is read again after a restart).
type pending struct {
	rec       *kgo.Record
	left      atomic.Int32
	abandoned atomic.Bool
}

// New builds the stage from cfg (cfg.Kafka.Brokers must be set). It
// connects to nothing: the Kafka client dials on first use in Run. Metrics
// are registered on deps.Metrics and unregistered by Close.
func New(cfg config.Config, deps stage.Deps) (*Stage, error) {
	deps = deps.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("alert routes config: %w", err)
	}
	if len(cfg.Kafka.Brokers) == 0 {
		return nil, errors.New("alert routes config: kafka.brokers is empty (start the embedded broker first or set it)")
	}
	rc := cfg.Alerts.Routes
	s := &Stage{cfg: cfg, rc: rc, log: deps.Log, clock: deps.Clock,
		parts: map[topicPartition]*partition{}, wake: make(chan struct{}, 1)}
	met, err := newMetrics(deps.Metrics)
	if err != nil {
		return nil, err
	}
	s.met = met
	s.burden, err = NewBurden(rc, deps.Metrics)
	if err != nil {
		met.unregister()
		return nil, err
	}
	client := &http.Client{
		Transport: &http.Transport{
			Proxy:               http.ProxyFromEnvironment,
			MaxIdleConnsPerHost: rc.InFlight,
			IdleConnTimeout:     90 * time.Second,
			TLSHandshakeTimeout: 10 * time.Second,
		},
		// A webhook that redirects is misconfigured: its 3xx is
		// reported (as permanent) instead of re-posting elsewhere.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	for _, w := range rc.Webhooks {
		if w.SecretEnv != "" {
			v, ok := os.LookupEnv(w.SecretEnv)
			if !ok || v == "" {
				s.burden.unregister()
				met.unregister()
				return nil, fmt.Errorf("alert routes config: alerts.routes.webhooks %s: environment variable %s (secret_env) is not set", w.Name, w.SecretEnv)
			}
			w.Secret = v
		}
		s.routes = append(s.routes, newRoute(w, rc, client))
	}
	cl, err := kgo.NewClient(append(bus.ClientOpts(cfg.Kafka, deps.Log),
		kgo.ConsumerGroup(rc.Group),
		kgo.ConsumeTopics(cfg.Kafka.Topics.Alerts),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.FetchMaxWait(time.Second),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.OnPartitionsRevoked(s.onRevoked),
		kgo.OnPartitionsLost(s.onLost),
	)...)
	if err != nil {
		s.burden.unregister()
		met.unregister()
		return nil, fmt.Errorf("creating kafka client: %w", err)
	}
	s.cl = cl
	return s, nil
}

// Burden returns the stage's burden accounting (its metrics are registered
// on the stage's registry); safe for concurrent use.
func (s *Stage) Burden() *Burden { return s.burden }

// Run consumes and routes until ctx is cancelled, then waits (up to
// alerts.routes.drain_timeout) for the queued deliveries, commits what
// finished and returns nil. Deliveries still unfinished then are not
// committed and happen again after a restart.
func (s *Stage) Run(ctx context.Context) error {
	names := make([]string, len(s.routes))
	for i, r := range s.routes {
		names[i] = r.cfg.Name
	}
	s.log.Info("alert routes running", "group", s.rc.Group, "topic", s.cfg.Kafka.Topics.Alerts, "webhooks", names)
	// work outlives ctx by the drain timeout, so deliveries in flight at
	// shutdown can finish.
	work, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWork()
	stopTimer := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(s.rc.DrainTimeout, stopWork)
		context.AfterFunc(work, func() { t.Stop() })
	})
	defer stopTimer()
	s.mu.Lock()
	s.stopWorkers = stopWork
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, r := range s.routes {
		var rwg sync.WaitGroup
		for range s.rc.InFlight {
			rwg.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer rwg.Done()
				s.worker(work, r)
			}()
		}
		go func() { rwg.Wait(); close(r.workers) }()
	}
	for ctx.Err() == nil {
		pctx, cancel := context.WithTimeout(ctx, 250*time.Millisecond)
		fetches := s.cl.PollRecords(pctx, 256)
		cancel()
		if fetches.IsClientClosed() {
			stopWork()
			wg.Wait()
			return errors.New("alert routes: kafka client closed while running")
		}
		fetches.EachError(func(topic string, partition int32, err error) {
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
				return
			}
			s.met.fetchErrors.Inc()
			s.log.Warn("kafka fetch error", "topic", topic, "partition", partition, "err", err)
		})
		for it := fetches.RecordIter(); !it.Done(); {
			s.dispatch(ctx, work, it.Next())
		}
		s.cl.AllowRebalance()
		_ = s.commit(work)
	}
	err := s.drain(work)
	stopWork()
	for _, r := range s.routes {
		s.met.queued.WithLabelValues(r.cfg.Name).Set(0)
	}
	wg.Wait()
	return err
}

// dispatch decodes rec, counts its burden, and queues it on every route
// that takes it. It blocks while a route's queue is full, at most
// queue_wait per route (then that route's event is dead-lettered), or
// until ctx ends (then the record stays unfinished and is read again).
func (s *Stage) dispatch(ctx, work context.Context, rec *kgo.Record) {
	s.met.events.Inc()
	p := &pending{rec: rec}
	p.left.Store(1) // dispatch's own hold, dropped once queued everywhere
	s.track(p)
	var ev vigilv1.AlertEvent
	if err := proto.Unmarshal(rec.Value, &ev); err != nil {
		s.met.undecodable.Inc()
		s.log.Error("alert record does not decode; dead-lettering it", "partition", rec.Partition, "offset", rec.Offset, "err", err)
		if s.deadLetter(work, nil, rec, nil, rec.Value, ReasonUndecodable,
			fmt.Sprintf("the alert routes could not decode this record as vigil.v1.AlertEvent: %v", err)) == nil {
			s.finish(p)
		} else {
			p.abandoned.Store(true)
		}
		return
	}
	s.burden.Observe(&ev)
	var takers []*route
	for _, r := range s.routes {
		if r.takes(&ev) {
			takers = append(takers, r)
		}
	}
	if len(takers) == 0 {
		s.finish(p)
		return
	}
	body, err := jsonBody.Marshal(&ev)
	if err != nil { // cannot happen for a decoded message; keep the record unfinished
		s.log.Error("encoding alert event as json", "event_id", ev.GetEventId(), "err", err)
		return
	}
	p.left.Add(int32(len(takers)))
	now := time.Now()
	for _, r := range takers {
		j := &job{p: p, ev: &ev, body: body, read: now}
		select {
		case r.queue <- j:
			s.met.queued.WithLabelValues(r.cfg.Name).Set(float64(len(r.queue)))
			continue
		default:
		}
		t := time.NewTimer(s.rc.QueueWait)
		select {
		case r.queue <- j:
			s.met.queued.WithLabelValues(r.cfg.Name).Set(float64(len(r.queue)))
		case <-ctx.Done():
			// Shutting down: the record stays unfinished (not committed).
			p.abandoned.Store(true)
			t.Stop()
			return
		case <-t.C:
			s.met.overflow.WithLabelValues(r.cfg.Name).Inc()
			s.log.Warn("webhook queue full; dead-lettering the event for this route", "route", r.cfg.Name,
				"queue_size", s.rc.QueueSize, "waited", s.rc.QueueWait, "event_id", ev.GetEventId())
			if s.deadLetter(work, r, rec, &ev, body, ReasonWebhookOverflow,
				fmt.Sprintf("webhook route %s (%s): queue of %d events stayed full for %s", r.cfg.Name, r.cfg.URL, s.rc.QueueSize, s.rc.QueueWait)) == nil {
				s.met.deliveries.WithLabelValues(r.cfg.Name, "dead_lettered").Inc()
				s.finish(p)
			} else {
				p.abandoned.Store(true) // shutting down
			}
		}
		t.Stop()
	}
	s.finish(p)
}

// worker delivers r's queued jobs until ctx ends.
func (s *Stage) worker(ctx context.Context, r *route) {
	for {
		select {
		case <-ctx.Done():
			return
		case j := <-r.queue:
			s.met.queued.WithLabelValues(r.cfg.Name).Set(float64(len(r.queue)))
			if s.deliver(ctx, r, j) {
				s.finish(j.p)
			}
		}
	}
}

// deliver tries j on r up to max_attempts times, then dead-letters it. It
// reports whether j finished (delivered or dead-lettered); false when ctx
// ended first.
func (s *Stage) deliver(ctx context.Context, r *route, j *job) bool {
	name := r.cfg.Name
	var last *attemptError
	n := 1
	for ; ; n++ {
		start := time.Now()
		err := r.attempt(ctx, j, n, s.clock.Now())
		s.met.request.WithLabelValues(name).Observe(time.Since(start).Seconds())
		if err == nil {
			s.met.deliveries.WithLabelValues(name, "delivered").Inc()
			s.met.delivery.WithLabelValues(name).Observe(time.Since(j.read).Seconds())
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		errors.As(err, &last)
		class := "permanent"
		if last.retriable {
			class = "retriable"
		}
		s.met.failures.WithLabelValues(name, class).Inc()
		if !last.retriable || n >= s.rc.MaxAttempts {
			break
		}
		delay := max(backoff(s.rc.RetryInitial, s.rc.RetryMax, n), min(last.retryAfter, s.rc.RetryMax))
		s.log.Warn("webhook delivery failed, retrying", "route", name, "event_id", j.ev.GetEventId(),
			"attempt", n, "retry_in", delay.Round(time.Millisecond), "err", err)
		s.met.retries.WithLabelValues(name).Inc()
		if sleep(ctx, delay) != nil {
			return false
		}
	}
	status := "none"
	if last.status != 0 {
		status = fmt.Sprint(last.status)
	}
	msg := fmt.Sprintf("webhook route %s (%s) did not accept event %s after %d attempt(s); last status %s; last error: %v",
		name, r.cfg.URL, j.ev.GetEventId(), n, status, last.err)
	s.log.Error("webhook delivery failed; dead-lettering", "route", name, "event_id", j.ev.GetEventId(), "status", last.status, "err", last.err)
	if s.deadLetter(ctx, r, j.p.rec, j.ev, j.body, ReasonWebhookFailed, msg) != nil {
		return false
	}
	s.met.deliveries.WithLabelValues(name, "dead_lettered").Inc()
	return true
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// deadLetter produces the dead letter of ev (nil when undecodable) on
// route r (nil for the whole record), retrying until ctx ends.
func (s *Stage) deadLetter(ctx context.Context, r *route, rec *kgo.Record, ev *vigilv1.AlertEvent, raw []byte, reason, msg string) error {
	dl := &vigilv1.DeadLetter{
		SchemaVersion: 1,
		Reason:        reason,
		Message:       msg,
		Origin:        fmt.Sprintf("kafka topic %s partition %d offset %d", rec.Topic, rec.Partition, rec.Offset),
		Raw:           raw,
		RefusedTimeMs: s.clock.Now().UnixMilli(),
		ContentType:   "application/x-protobuf; messageType=vigil.v1.AlertEvent",
	}
	if r != nil {
		dl.Field = "alerts.routes.webhooks." + r.cfg.Name
		dl.Origin = fmt.Sprintf("alert route %s (%s), %s", r.cfg.Name, r.cfg.URL, dl.Origin)
		dl.ContentType = "application/json"
	}
	if ev != nil {
		dl.Tenant, dl.Patient, dl.MessageId = ev.GetTenant(), ev.GetPatient(), ev.GetEventId()
	} else if tenant, patient, ok := bus.SplitPatientKey(rec.Key); ok {
		dl.Tenant, dl.Patient = tenant, patient
	}
	publish.TruncateRaw(dl, s.cfg.Ingest.DeadLetterRawLimit)
	value, err := proto.Marshal(dl)
	if err != nil {
		return fmt.Errorf("encoding dead letter: %w", err)
	}
	for n := 1; ; n++ {
		err := s.cl.ProduceSync(ctx, &kgo.Record{Topic: s.cfg.Kafka.Topics.DeadLetter, Key: deadLetterKey, Value: value}).FirstErr()
		if err == nil {
			break
		}
		if ctx.Err() != nil || s.closing.Load() {
			return fmt.Errorf("producing dead letter: %w", err)
		}
		delay := backoff(s.rc.RetryInitial, s.rc.RetryMax, n)
		s.log.Warn("producing dead letter failed, retrying", "topic", s.cfg.Kafka.Topics.DeadLetter, "retry_in", delay, "err", err)
		if err := sleep(ctx, delay); err != nil {
			return err
		}
	}
	route := ""
	if r != nil {
		route = r.cfg.Name
	}
	s.met.deadLetters.WithLabelValues(route, reason).Inc()
	return nil
}

// track appends p to its partition's FIFO.
func (s *Stage) track(p *pending) {
	s.mu.Lock()
	defer s.mu.Unlock()
	tp := topicPartition{p.rec.Topic, p.rec.Partition}
	pt := s.parts[tp]
	if pt == nil {
		pt = &partition{}
		s.parts[tp] = pt
	}
	pt.q = append(pt.q, p)
}

// finish marks one route of p finished; safe for concurrent use.
func (s *Stage) finish(p *pending) {
	if p.left.Add(-1) <= 0 {
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
}

// advance moves every partition's commit point past its leading finished
// records. Called with s.mu held.
func (s *Stage) advance() {
	for _, pt := range s.parts {
		i := 0
		for ; i < len(pt.q) && pt.q[i].left.Load() <= 0; i++ {
			pt.commit = kgo.EpochOffset{Epoch: pt.q[i].rec.LeaderEpoch, Offset: pt.q[i].rec.Offset + 1}
			pt.dirty = true
		}
		if i > 0 {
			pt.q = append(pt.q[:0], pt.q[i:]...)
		}
	}
}

// commit commits the offsets of every record finished since the last
// commit. A failed commit is logged and counted; it is retried with the
// next one.
func (s *Stage) commit(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advance()
	offsets := map[string]map[int32]kgo.EpochOffset{}
	for tp, pt := range s.parts {
		if !pt.dirty {
			continue
		}
		if offsets[tp.topic] == nil {
			offsets[tp.topic] = map[int32]kgo.EpochOffset{}
		}
		offsets[tp.topic][tp.partition] = pt.commit
	}
	if len(offsets) == 0 {
		return nil
	}
	cerr := bus.CommitOffsetsSync(ctx, s.cl, offsets, func(topic string, partition int32) {
		if pt := s.parts[topicPartition{topic, partition}]; pt != nil && pt.commit == offsets[topic][partition] {
			pt.dirty = false
		}
	})
	if cerr != nil {
		s.met.commitErrors.Inc()
		s.log.Warn("committing kafka offsets failed; will retry", "err", cerr)
		return fmt.Errorf("committing kafka offsets: %w", cerr)
	}
	s.met.commits.Inc()
	return nil
}

// unfinished counts the records read and not finished, and of those the
// ones still able to finish (not abandoned by dispatch).
func (s *Stage) unfinished() (all, live int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advance()
	for _, pt := range s.parts {
		all += len(pt.q)
		for _, p := range pt.q {
			if !p.abandoned.Load() {
				live++
			}
		}
	}
	return all, live
}

// drain waits until every record read is finished or ctx (the work
// context, ending drain_timeout after Run's) ends, then commits.
func (s *Stage) drain(ctx context.Context) error {
	for _, live := s.unfinished(); live > 0 && ctx.Err() == nil; _, live = s.unfinished() {
		_ = s.commit(ctx)
		select {
		case <-s.wake:
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	err := s.commit(cctx)
	if n, _ := s.unfinished(); n > 0 {
		err = errors.Join(err, fmt.Errorf("draining alert routes: %d events not delivered within alerts.routes.drain_timeout (%s); they were not committed and will be delivered again", n, s.rc.DrainTimeout))
	}
	if err == nil {
		s.log.Info("alert routes drained")
	}
	return err
}

// onRevoked runs on franz-go's goroutine when partitions move to another
// member: it waits (bounded by drain_timeout) for their queued events,
// commits, then forgets them.
func (s *Stage) onRevoked(ctx context.Context, _ *kgo.Client, revoked map[string][]int32) {
	if !s.closing.Load() {
		dctx, cancel := context.WithTimeout(ctx, s.rc.DrainTimeout)
		for s.unfinishedIn(revoked) > 0 && dctx.Err() == nil {
			select {
			case <-s.wake:
			case <-dctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
		_ = s.commit(dctx)
		cancel()
	}
	s.forget(revoked)
}

func (s *Stage) unfinishedIn(parts map[string][]int32) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advance()
	n := 0
	for topic, ps := range parts {
		for _, p := range ps {
			if pt := s.parts[topicPartition{topic, p}]; pt != nil {
				n += len(pt.q)
			}
		}
	}
	return n
}

// onLost forgets partitions the group took away: their unfinished events
// are delivered again by the new owner (the workers may still deliver
// those queued here: at-least-once).
func (s *Stage) onLost(_ context.Context, _ *kgo.Client, lost map[string][]int32) {
	s.log.Warn("kafka partitions lost; unfinished deliveries will be redone by their new owner", "partitions", lost)
	s.forget(lost)
}

func (s *Stage) forget(parts map[string][]int32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for topic, ps := range parts {
		for _, p := range ps {
			delete(s.parts, topicPartition{topic, p})
		}
	}
}

// Close stops the workers, leaves the consumer group and closes the Kafka
// client. It delivers nothing: Run drains before it returns. Idempotent;
// ctx bounds waiting for the Kafka client.
func (s *Stage) Close(ctx context.Context) error {
	s.closeOnce.Do(func() {
		s.closing.Store(true)
		s.mu.Lock()
		if s.stopWorkers != nil {
			s.stopWorkers()
		}
		s.mu.Unlock()
		done := make(chan struct{})
		go func() {
			s.cl.Close()
			close(done)
		}()
		select {
		case <-done:
		case <-ctx.Done():
			s.closeErr = fmt.Errorf("closing kafka client: %w", ctx.Err())
		}
		s.burden.unregister()
		s.met.unregister()
	})
	return s.closeErr
}
