package chsink

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// ReasonSinkRejected is the dead-letter reason of a record the sink could
// not store: undecodable, or refused by ClickHouse.
const ReasonSinkRejected = "sink_rejected"

// errClosed stops retry loops when Close was called under a running Run.
var errClosed = errors.New("clickhouse sink closed")

// deadLetterKey keys the sink's dead letters (the topic is keyed by source).
var deadLetterKey = []byte("sink")

// Sink is the ClickHouse sink stage. It consumes the samples, features,
// scores, alerts and dead-letter topics in consumer group cfg.Sink.Group
// (read-committed, so aborted stream transactions are never stored) and
// writes each record's rows into its table.
//
// Rows are buffered per table and a table's batch is inserted when it holds
// cfg.Sink.BatchRows rows or cfg.Sink.BatchInterval has passed since its
// first record. While a batch is being inserted (and retried) the sink does
// not poll Kafka, so memory stays bounded by one batch per table plus the
// Kafka client's fetch buffer. Kafka offsets are committed only after
// ClickHouse accepted every row of the records up to them (or the record was
// dead-lettered), so a crash loses nothing; the tables' identities make the
// rows re-inserted after a crash collapse into one (see the migrations).
//
// An insert that fails with a retriable error (IsRetriable) is retried with
// jittered exponential backoff from cfg.Sink.RetryInitial to
// cfg.Sink.RetryMax, for as long as Run's context lives. A batch refused for
// its data is split in halves until the refused records are isolated; a
// record that cannot be decoded or is refused alone is logged, counted and
// produced to the dead-letter topic with reason sink_rejected, then skipped,
// so one bad record never blocks its partition.
//
// Run must be called at most once; Close may be called at any time after
// Run returned (or instead of it) and is idempotent. Neither is meant to be
// called concurrently with itself.
type Sink struct {
	cfg   config.Config
	log   *slog.Logger
	clock clock.Clock
	met   *metrics
	conn  driver.Conn
	cl    *kgo.Client

	// mu serialises the poll loop's processing with the rebalance
	// callbacks (which franz-go runs on its own goroutine); it guards
	// tables' batches and uncommitted.
	mu     sync.Mutex
	tables []*table
	topics map[string]*table
	// uncommitted holds, per partition, the next offset to commit: every
	// record before it is stored or dead-lettered.
	uncommitted map[string]map[int32]kgo.EpochOffset

	closing   atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

// table is one table's batch: the records read since its last insert.
type table struct {
	spec
	topic   string
	insert  string
	entries []*entry
	rows    int
	since   time.Time
}

// entry is one Kafka record and its rows.
type entry struct {
	rec  *kgo.Record
	rows [][]any
	// reject is why the record cannot be stored; it goes to the
	// dead-letter topic.
	reject error
	// done is set once the rows are stored or the record dead-lettered, so
	// an insert interrupted half-way does not redo that part.
	done bool
}

// New builds the sink from cfg (cfg.Kafka.Brokers and cfg.ClickHouse.Addr
// must be set: `vigil run` fills them in for the embedded services). It
// connects to nothing: both clients dial on first use in Run. Metrics are
// registered on deps.Metrics and unregistered by Close.
func New(cfg config.Config, deps stage.Deps) (*Sink, error) {
	deps = deps.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("clickhouse sink config: %w", err)
	}
	if len(cfg.Kafka.Brokers) == 0 {
		return nil, errors.New("clickhouse sink config: kafka.brokers is empty (start the embedded broker first or set it)")
	}
	if cfg.ClickHouse.Addr == "" {
		return nil, errors.New("clickhouse sink config: clickhouse.addr is empty (start the local server first or set it)")
	}
	s := &Sink{
		cfg:         cfg,
		log:         deps.Log,
		clock:       deps.Clock,
		topics:      map[string]*table{},
		uncommitted: map[string]map[int32]kgo.EpochOffset{},
	}
	sp := specs()
	t := cfg.Kafka.Topics
	for _, tt := range []struct{ table, topic string }{
		{tableSamples, t.Samples}, {tableFeatures, t.Features}, {tableScores, t.Scores},
		{tableAlerts, t.Alerts}, {tableDeadLetters, t.DeadLetter},
	} {
		tb := &table{spec: sp[tt.table], topic: tt.topic}
		tb.insert = tb.spec.insert()
		s.tables = append(s.tables, tb)
		s.topics[tt.topic] = tb
	}
	met, err := newMetrics(deps.Metrics)
	if err != nil {
		return nil, err
	}
	s.met = met
	conn, err := clickhouse.Open(options(cfg.ClickHouse))
	if err != nil {
		met.unregister()
		return nil, fmt.Errorf("creating clickhouse client for %s: %w", cfg.ClickHouse.Addr, err)
	}
	s.conn = conn
	topics := make([]string, 0, len(s.tables))
	for _, tb := range s.tables {
		topics = append(topics, tb.topic)
	}
	opts := append(bus.ClientOpts(cfg.Kafka, deps.Log),
		kgo.ConsumerGroup(cfg.Sink.Group),
		kgo.ConsumeTopics(topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		// A fetch waiting on idle partitions holds back partitions that
		// are newly assigned; keep that wait short.
		kgo.FetchMaxWait(time.Second),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.OnPartitionsRevoked(s.onRevoked),
		kgo.OnPartitionsLost(s.onLost),
	)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		_ = conn.Close()
		met.unregister()
		return nil, fmt.Errorf("creating kafka client: %w", err)
	}
	s.cl = cl
	return s, nil
}

// Run consumes and stores until ctx is cancelled, then finishes inserting
// what it has read (inserts in flight are not interrupted; all of it bounded
// by cfg.Sink.DrainTimeout from the cancellation), commits, and returns nil.
// If the drain cannot finish (ClickHouse unreachable), Run returns an error;
// those records were not committed and are read again on the next start.
func (s *Sink) Run(ctx context.Context) error {
	s.log.Info("clickhouse sink running", "group", s.cfg.Sink.Group, "clickhouse", s.cfg.ClickHouse.Addr,
		"database", s.cfg.ClickHouse.Database, "batch_rows", s.cfg.Sink.BatchRows, "batch_interval", s.cfg.Sink.BatchInterval)
	// work outlives ctx by the drain timeout, so that a cancellation does
	// not abort an insert half-way (its outcome unknown, so sent again).
	work, stopWork := drainContext(ctx, s.cfg.Sink.DrainTimeout)
	defer stopWork()
	for ctx.Err() == nil {
		pctx, cancel := s.pollContext(ctx)
		fetches := s.cl.PollRecords(pctx, s.cfg.Sink.BatchRows)
		cancel()
		if fetches.IsClientClosed() {
			return errors.New("clickhouse sink: kafka client closed while running")
		}
		fetches.EachError(func(topic string, partition int32, err error) {
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
				return
			}
			s.met.fetchErrors.Inc()
			s.log.Warn("kafka fetch error", "topic", topic, "partition", partition, "err", err)
		})
		s.mu.Lock()
		err := s.process(work, fetches)
		s.mu.Unlock()
		s.cl.AllowRebalance()
		if err != nil {
			break
		}
	}
	return s.drain(work)
}

// drainContext returns a context that is not cancelled with ctx but d after
// it (or by the returned cancel).
func drainContext(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	work, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(d, cancel)
		context.AfterFunc(work, func() { t.Stop() })
	})
	return work, func() {
		stop()
		cancel()
	}
}

// pollContext bounds the next poll by the earliest batch deadline, so that
// a batch is inserted on time even when no more records arrive.
func (s *Sink) pollContext(ctx context.Context) (context.Context, context.CancelFunc) {
	s.mu.Lock()
	var next time.Time
	for _, t := range s.tables {
		if len(t.entries) > 0 {
			if due := t.since.Add(s.cfg.Sink.BatchInterval); next.IsZero() || due.Before(next) {
				next = due
			}
		}
	}
	if len(s.uncommitted) > 0 {
		// A commit failed: try again within a second.
		if due := s.clock.Now().Add(time.Second); next.IsZero() || due.Before(next) {
			next = due
		}
	}
	s.mu.Unlock()
	if next.IsZero() {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, max(next.Sub(s.clock.Now()), time.Millisecond))
}

// process appends the polled records to their tables, inserts the batches
// that are full or due, and commits. It returns an error only when ctx
// ended (the drain timeout passed); then records after the one it stopped at
// are not appended (their offsets are not committed, so they are read
// again). Called with s.mu held.
func (s *Sink) process(ctx context.Context, fetches kgo.Fetches) error {
	for it := fetches.RecordIter(); !it.Done(); {
		rec := it.Next()
		t := s.topics[rec.Topic]
		if t == nil {
			continue
		}
		e := &entry{rec: rec}
		e.rows, e.reject = t.spec.rows(rec.Value)
		if len(t.entries) == 0 {
			t.since = s.clock.Now()
		}
		t.entries = append(t.entries, e)
		t.rows += len(e.rows)
		s.met.buffered.WithLabelValues(t.name()).Set(float64(t.rows))
		if t.rows >= s.cfg.Sink.BatchRows {
			if err := s.flush(ctx, t); err != nil {
				return err
			}
		}
	}
	now := s.clock.Now()
	for _, t := range s.tables {
		if len(t.entries) > 0 && now.Sub(t.since) >= s.cfg.Sink.BatchInterval {
			if err := s.flush(ctx, t); err != nil {
				return err
			}
		}
	}
	_ = s.commit(ctx)
	return nil
}

func (t *table) name() string { return t.spec.table }

// flush stores t's batch: inserts the rows (retrying, isolating refused
// records), dead-letters the rejected records, then marks every record's
// offset committable and empties the batch. It returns an error only when
// ctx ended, leaving the batch in place (what was done is remembered).
func (s *Sink) flush(ctx context.Context, t *table) error {
	if len(t.entries) == 0 {
		return nil
	}
	var todo []*entry
	for _, e := range t.entries {
		if !e.done && e.reject == nil && len(e.rows) > 0 {
			todo = append(todo, e)
		}
	}
	if len(todo) > 0 {
		if err := s.insertEntries(ctx, t, todo); err != nil {
			return err
		}
	}
	for _, e := range t.entries {
		if e.done {
			continue
		}
		if e.reject != nil {
			if err := s.deadLetter(ctx, t, e); err != nil {
				return err
			}
		}
		e.done = true
	}
	for _, e := range t.entries {
		offs := s.uncommitted[e.rec.Topic]
		if offs == nil {
			offs = map[int32]kgo.EpochOffset{}
			s.uncommitted[e.rec.Topic] = offs
		}
		offs[e.rec.Partition] = kgo.EpochOffset{Epoch: e.rec.LeaderEpoch, Offset: e.rec.Offset + 1}
	}
	s.log.Debug("stored batch", "table", t.name(), "records", len(t.entries), "rows", t.rows,
		"first", fmt.Sprintf("%s/%d@%d", t.entries[0].rec.Topic, t.entries[0].rec.Partition, t.entries[0].rec.Offset))
	t.entries, t.rows = nil, 0
	s.met.buffered.WithLabelValues(t.name()).Set(0)
	return nil
}

// insertEntries inserts the rows of es as one batch. Retriable failures are
// retried until ctx ends; a batch refused for its data is split in halves,
// and a single record refused alone gets its reject set.
func (s *Sink) insertEntries(ctx context.Context, t *table, es []*entry) error {
	for attempt := 0; ; attempt++ {
		err := s.send(ctx, t, es)
		if err == nil {
			for _, e := range es {
				e.done = true
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if s.closing.Load() {
			return errClosed
		}
		if IsRetriable(err) {
			s.met.retries.WithLabelValues(t.name()).Inc()
			delay := s.backoff(attempt)
			s.log.Warn("clickhouse insert failed, retrying", "table", t.name(), "records", len(es),
				"attempt", attempt+1, "retry_in", delay.Round(time.Millisecond), "err", err)
			if err := sleep(ctx, delay); err != nil {
				return err
			}
			continue
		}
		if len(es) == 1 {
			es[0].reject = fmt.Errorf("clickhouse refused the rows: %w", err)
			return nil
		}
		s.log.Info("clickhouse refused a batch for its data, isolating the records", "table", t.name(), "records", len(es), "err", err)
		mid := len(es) / 2
		if err := s.insertEntries(ctx, t, es[:mid]); err != nil {
			return err
		}
		return s.insertEntries(ctx, t, es[mid:])
	}
}

// send makes one insert attempt, bounded by cfg.Sink.InsertTimeout.
func (s *Sink) send(ctx context.Context, t *table, es []*entry) error {
	actx, cancel := context.WithTimeout(ctx, s.cfg.Sink.InsertTimeout)
	defer cancel()
	start := time.Now()
	b, err := s.conn.PrepareBatch(actx, t.insert)
	if err != nil {
		return fmt.Errorf("preparing insert into %s: %w", t.name(), err)
	}
	n := 0
	for _, e := range es {
		for _, r := range e.rows {
			if err := b.Append(r...); err != nil {
				_ = b.Abort()
				if actx.Err() != nil {
					return fmt.Errorf("appending to %s: %w", t.name(), err)
				}
				return permanent("", fmt.Errorf("appending a row to %s: %w", t.name(), err))
			}
			n++
		}
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("inserting %d rows into %s: %w", n, t.name(), err)
	}
	s.met.rowsInserted.WithLabelValues(t.name()).Add(float64(n))
	s.met.batches.WithLabelValues(t.name()).Inc()
	s.met.insertSeconds.WithLabelValues(t.name()).Observe(time.Since(start).Seconds())
	return nil
}

// backoff is the delay before retry attempt+1: exponential from
// RetryInitial, capped at RetryMax, with equal jitter (half fixed, half
// random) so that several sinks do not retry in step.
func (s *Sink) backoff(attempt int) time.Duration {
	d := s.cfg.Sink.RetryInitial
	for i := 0; i < attempt && d < s.cfg.Sink.RetryMax; i++ {
		d *= 2
	}
	d = min(d, s.cfg.Sink.RetryMax)
	return d/2 + rand.N(d/2+1)
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

// deadLetter logs and counts a record the sink cannot store and produces it
// to the dead-letter topic (retrying until ctx ends). A record read from the
// dead-letter topic itself is only logged and counted, never produced again,
// so a dead letter the table refuses cannot loop.
func (s *Sink) deadLetter(ctx context.Context, t *table, e *entry) error {
	rec := e.rec
	field := t.name()
	var pe *PermanentError
	if errors.As(e.reject, &pe) && pe.Field != "" {
		field = pe.Field
	}
	if rec.Topic != s.cfg.Kafka.Topics.DeadLetter {
		dl := s.deadLetterFor(t, e, field)
		value, err := proto.Marshal(dl)
		if err != nil {
			return fmt.Errorf("encoding dead letter: %w", err)
		}
		for attempt := 0; ; attempt++ {
			out := &kgo.Record{Topic: s.cfg.Kafka.Topics.DeadLetter, Key: deadLetterKey, Value: value}
			err := s.cl.ProduceSync(ctx, out).FirstErr()
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if s.closing.Load() {
				return errClosed
			}
			delay := s.backoff(attempt)
			s.log.Warn("producing dead letter failed, retrying", "topic", s.cfg.Kafka.Topics.DeadLetter, "retry_in", delay, "err", err)
			if err := sleep(ctx, delay); err != nil {
				return err
			}
		}
	}
	s.met.rejected.WithLabelValues(t.name()).Inc()
	s.log.Error("clickhouse sink rejected a record", "table", t.name(), "topic", rec.Topic,
		"partition", rec.Partition, "offset", rec.Offset, "field", field, "err", e.reject,
		"dead_lettered", rec.Topic != s.cfg.Kafka.Topics.DeadLetter)
	return nil
}

func (s *Sink) deadLetterFor(t *table, e *entry, field string) *vigilv1.DeadLetter {
	rec := e.rec
	raw := rec.Value
	limit := s.cfg.Ingest.DeadLetterRawLimit
	truncated := len(raw) > limit
	if truncated {
		raw = raw[:limit]
	}
	dl := &vigilv1.DeadLetter{
		SchemaVersion: 1,
		Reason:        ReasonSinkRejected,
		Message: fmt.Sprintf("the clickhouse sink could not store this %s record in table %s: %v",
			t.message, t.name(), e.reject),
		Origin:        fmt.Sprintf("kafka topic %s partition %d offset %d", rec.Topic, rec.Partition, rec.Offset),
		Field:         field,
		Raw:           raw,
		RawSize:       uint64(len(rec.Value)),
		RawTruncated:  truncated,
		RefusedTimeMs: s.clock.Now().UnixMilli(),
		ContentType:   "application/x-protobuf; messageType=" + t.message,
	}
	if tenant, patient, ok := bus.SplitPatientKey(rec.Key); ok {
		dl.Tenant, dl.Patient = tenant, patient
	}
	if t.name() == tableSamples {
		var b vigilv1.SampleBatch
		if proto.Unmarshal(rec.Value, &b) == nil {
			dl.Source, dl.Device, dl.MessageId = b.GetSource(), b.GetDevice(), b.GetMessageId()
			dl.Tenant, dl.Patient = b.GetTenant(), b.GetPatient()
		}
	}
	return dl
}

// commit commits the offsets of everything stored since the last commit. A
// failed commit is logged and counted; the offsets stay and are committed
// with the next one. Called with s.mu held.
func (s *Sink) commit(ctx context.Context) error {
	if len(s.uncommitted) == 0 {
		return nil
	}
	offsets := make(map[string]map[int32]kgo.EpochOffset, len(s.uncommitted))
	for topic, ps := range s.uncommitted {
		offsets[topic] = make(map[int32]kgo.EpochOffset, len(ps))
		for p, o := range ps {
			offsets[topic][p] = o
		}
	}
	cerr := bus.CommitOffsetsSync(ctx, s.cl, offsets, func(topic string, partition int32) {
		// Forget the offset unless a newer one was stored meanwhile.
		if cur, ok := s.uncommitted[topic][partition]; ok && cur == offsets[topic][partition] {
			delete(s.uncommitted[topic], partition)
			if len(s.uncommitted[topic]) == 0 {
				delete(s.uncommitted, topic)
			}
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

// drain inserts everything read and commits, on shutdown; ctx is Run's
// work context (ending DrainTimeout after Run's).
func (s *Sink) drain(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, t := range s.tables {
		if err := s.flush(ctx, t); err != nil {
			errs = append(errs, fmt.Errorf("%d rows of table %s not stored within sink.drain_timeout (%s); they were not committed and will be read again: %w",
				t.rows, t.name(), s.cfg.Sink.DrainTimeout, err))
		}
	}
	if err := s.commit(ctx); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("draining clickhouse sink: %w", errors.Join(errs...))
	}
	s.log.Info("clickhouse sink drained")
	return nil
}

// onRevoked runs on franz-go's goroutine when partitions move to another
// member: it stores and commits what was read (bounded by DrainTimeout, so
// the rebalance is not held forever), then forgets those partitions.
func (s *Sink) onRevoked(ctx context.Context, _ *kgo.Client, revoked map[string][]int32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closing.Load() {
		dctx, cancel := context.WithTimeout(ctx, s.cfg.Sink.DrainTimeout)
		for _, t := range s.tables {
			if len(revoked[t.topic]) == 0 {
				continue
			}
			if err := s.flush(dctx, t); err != nil {
				s.log.Warn("partitions revoked before their rows were stored; the next owner reads them again",
					"table", t.name(), "rows", t.rows, "err", err)
				break
			}
		}
		_ = s.commit(dctx)
		cancel()
	}
	s.forget(revoked)
}

// onLost runs when the group dropped this member: the partitions' records
// read but not stored are forgotten (not committed: their new owner reads
// them again).
func (s *Sink) onLost(_ context.Context, _ *kgo.Client, lost map[string][]int32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.log.Warn("kafka partitions lost; records read from them and not yet stored will be read again by their new owner", "partitions", lost)
	s.forget(lost)
}

// forget drops the batched records and pending offsets of parts. Called
// with s.mu held.
func (s *Sink) forget(parts map[string][]int32) {
	for topic, ps := range parts {
		gone := map[int32]bool{}
		for _, p := range ps {
			gone[p] = true
			delete(s.uncommitted[topic], p)
		}
		if len(s.uncommitted[topic]) == 0 {
			delete(s.uncommitted, topic)
		}
		t := s.topics[topic]
		if t == nil || len(t.entries) == 0 {
			continue
		}
		kept := t.entries[:0]
		rows := 0
		for _, e := range t.entries {
			if !gone[e.rec.Partition] {
				kept = append(kept, e)
				rows += len(e.rows)
			}
		}
		t.entries, t.rows = kept, rows
		s.met.buffered.WithLabelValues(t.name()).Set(float64(rows))
	}
}

// Close leaves the consumer group and closes the Kafka client and the
// ClickHouse connection. It does not store anything: Run drains before it
// returns. Close is idempotent; ctx bounds waiting for the Kafka client.
func (s *Sink) Close(ctx context.Context) error {
	s.closeOnce.Do(func() {
		s.closing.Store(true)
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
		if err := s.conn.Close(); err != nil {
			s.closeErr = errors.Join(s.closeErr, fmt.Errorf("closing clickhouse connection: %w", err))
		}
		s.met.unregister()
	})
	return s.closeErr
}
