// Package stream is Vigil's stream stage: it consumes sample batches
// (vigil.samples.v1, keyed tenant/patient) in a consumer group and, per
// patient, aggregates 1-minute event-time windows (features/window), scores
// NEWS2 (detectors/ews) and runs the alert rules (detectors/alerting),
// writing features, scores, alerts and too-late dead letters with
// exactly-once semantics.
//
// # Transactions
//
// One franz-go GroupTransactSession (transactional id
// "<stream.group>-<stream.instance_id>", read-committed) carries everything:
// a transaction begins at the first input record after the previous one
// ended and holds the outputs, the changelog updates of every patient the
// transaction changed, and the input offsets. It is committed as soon as the
// fetched input is drained, and at the latest stream.commit_interval after it
// began, so that at low load an alert is committed milliseconds after its
// sample arrived and at high load transactions grow instead of multiplying.
// Rebalances are held off while a transaction is open (BlockRebalanceOnPoll)
// and allowed between transactions.
//
// # State
//
// Per-patient state (open windows, latest values, open alerts, last score)
// lives with the input partition that owns the patient. Its changelog is
// the compacted topic kafka.topics.state, co-partitioned with the input:
// a patient's state is written to the state partition with the number of
// the input partition it came from, inside a transaction that also
// commits outputs and offsets, but not in every one: a changed patient is
// written once its oldest unwritten change is stream.checkpoint_interval
// old (and at a graceful stop, and with whatever an idle timeout or the
// shutdown flush closed). Each written state records the input offset it
// reflects (applied_offset); each transaction writes, per input partition
// it commits, a checkpoint record: the offset at or below which all input
// is in written states. When partitions are assigned, their state is read
// back from the changelog to its end (read-committed, after any open
// transaction on it has finished), then the input from the checkpoint to
// the committed offset is applied again, silently, to the patients whose
// state does not yet reflect it (see replay in restore.go); on revocation
// or loss the state is dropped. When a transaction aborts, franz-go
// rewinds the input to the committed offsets and the processor restores
// its partitions the same way. A crash anywhere therefore leaves committed
// outputs, state and offsets from which a restart produces what an
// uninterrupted run would have (processing-time fields aside), after
// re-reading about one checkpoint interval of input.
//
// The partitions of one poll are processed concurrently, one goroutine
// per partition (a patient's records stay in order).
//
// Scale out by running more processors in the same group.
package stream

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/apache/arrow/go/v17/arrow/memory"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/plugin/kslog"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/detectors/alerting"
	"github.com/vigilhealth/vigil/features/window"
	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// restoreTimeout bounds restoring the state of newly assigned partitions
// (including waiting for a crashed predecessor's open transaction on the
// changelog to be aborted by the broker's transaction timeout).
const restoreTimeout = 2 * time.Minute

// errClosed reports that Close was called while Run was running.
var errClosed = errors.New("stream processor closed")

// PermanentError marks an error that restarting the consumer-group session
// cannot fix (misconfigured topics, a fenced transactional id, a corrupt
// changelog). Run returns it; other session errors are retried.
type PermanentError struct{ Err error }

func (e *PermanentError) Error() string { return e.Err.Error() }
func (e *PermanentError) Unwrap() error { return e.Err }

func permanent(err error) error { return &PermanentError{Err: err} }

// Processor is the stream stage. Create it with New, run it with Run (one
// call at a time), stop it by cancelling Run's context, then Close it.
type Processor struct {
	cfg   config.Config
	log   *slog.Logger
	clock clock.Clock
	eng   *engine
	m     *metrics
	txnID string

	mu     sync.Mutex
	sess   *kgo.GroupTransactSession
	closed bool

	// hookBeforeEnd, when set (by tests, before Run), is called after a
	// transaction's records are acknowledged and before it is ended: the
	// point where a crash leaves the most uncommitted output behind.
	hookBeforeEnd func()
}

// New validates cfg, loads the scoring tables (detectors.scores) and the
// metric catalogue (cfg.Ingest.Catalog, or the
// embedded one), and registers the metrics on deps.Metrics. With
// detectors.models.run set it loads those models from the registry and opens
// them on the Runtime given by WithModelRuntime, else on one of its own that
// Close closes (stream/models.go). It connects to nothing.
func New(cfg config.Config, deps stage.Deps, opts ...Option) (*Processor, error) {
	deps = deps.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("stream config: %w", err)
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
	instance := cfg.Stream.InstanceID
	if instance == "" {
		var err error
		if instance, err = os.Hostname(); err != nil || instance == "" {
			return nil, fmt.Errorf("stream.instance_id is empty and the host name is unknown (%v): set it", err)
		}
	}
	eng, err := newEngine(cfg, nil, cat, memory.NewGoAllocator())
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(deps.Metrics)
	if err != nil {
		return nil, err
	}
	if eng.models, err = openModels(cfg, newOptions(opts).runtime, cat, deps); err != nil {
		return nil, err
	}
	if eng.models != nil {
		// Rules with `raise: manifest` read the served models' thresholds.
		eng.alerts = alerting.New(eng.alerts.File(), alerting.WithManifestThresholds(eng.models.threshold))
	}
	return &Processor{
		cfg:   cfg,
		log:   deps.Log,
		clock: deps.Clock,
		m:     m,
		txnID: cfg.Stream.Group + "-" + instance,
		eng:   eng,
	}, nil
}

// TransactionalID returns the Kafka transactional id the processor uses.
func (p *Processor) TransactionalID() string { return p.txnID }

// Run consumes and processes until ctx is cancelled, then commits the open
// transaction and returns nil. It checks the topics first (the state topic
// must have as many partitions as the samples topic). A failing
// consumer-group session is restarted with backoff (its uncommitted work is
// redone); a PermanentError is returned.
func (p *Processor) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	wait := func() bool {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 10*time.Second)
		return true
	}
	for {
		err := p.checkTopics(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		if isPermanent(err) {
			return err
		}
		p.log.Warn("checking stream topics failed; retrying", "err", err, "backoff", backoff)
		if !wait() {
			return nil
		}
	}
	backoff = 100 * time.Millisecond
	for {
		err := p.runSession(ctx)
		switch {
		case err == nil, errors.Is(err, errClosed), p.isClosed():
			return nil
		case isPermanent(err):
			return err
		case ctx.Err() != nil:
			// The failed transaction was not committed: nothing is lost,
			// the next run processes its input again.
			p.log.Warn("stream session failed while stopping", "err", err)
			return nil
		}
		p.m.restarts.Inc()
		p.log.Warn("stream session failed; restarting", "err", err, "backoff", backoff)
		if !wait() {
			return nil
		}
	}
}

func isPermanent(err error) bool {
	var perm *PermanentError
	return errors.As(err, &perm)
}

// Close releases the Kafka client if Run left one open. It is idempotent;
// calling it while Run runs makes Run return.
func (p *Processor) Close(context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	if p.sess != nil {
		// Allowing rebalance: Run may hold it blocked from a poll.
		p.sess.CloseAllowingRebalance()
	}
	return p.eng.models.close()
}

func (p *Processor) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

func (p *Processor) setSession(s *kgo.GroupTransactSession) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed && s != nil {
		return false
	}
	p.sess = s
	return true
}

// checkTopics verifies that the input and changelog topics exist and are
// co-partitioned.
func (p *Processor) checkTopics(ctx context.Context) error {
	cl, err := kgo.NewClient(p.clientOpts()...)
	if err != nil {
		return permanent(fmt.Errorf("creating kafka client: %w", err))
	}
	defer cl.Close()
	samples, state := p.cfg.Kafka.Topics.Samples, p.cfg.Kafka.Topics.State
	td, err := kadm.NewClient(cl).ListTopics(ctx, samples, state)
	if err != nil {
		return fmt.Errorf("listing topics %s and %s: %w", samples, state, err)
	}
	for _, name := range []string{samples, state} {
		if t, ok := td[name]; !ok || t.Err != nil {
			return permanent(fmt.Errorf("topic %s is missing (vigil creates its topics at start; create it with the partition count of the others): %v", name, td.Error()))
		}
	}
	if ns, nc := len(td[samples].Partitions), len(td[state].Partitions); ns != nc {
		return permanent(fmt.Errorf("state topic %s has %d partitions but samples topic %s has %d: the changelog must be co-partitioned with the input; recreate %s with %d partitions",
			state, nc, samples, ns, state, ns))
	}
	return nil
}

func (p *Processor) clientOpts() []kgo.Opt {
	return append(bus.ClientOpts(p.cfg.Kafka, p.log),
		// franz-go logs every transaction begin/end at info: demote.
		kgo.WithLogger(quietLogger{kslog.New(p.log.With("component", "kafka"))}))
}

// throughputOpts tunes the session's client for throughput; the commit
// interval, not linger, bounds latency (End flushes the transaction).
//   - No linger: a transaction's records go out while the engine works
//     on the next ones, batched by what accumulates meanwhile.
//   - Room for a whole poll's outputs (MaxBufferedRecords; bytes stay
//     bounded by kafka.max_buffered_bytes): Produce blocks, as
//     backpressure, only beyond that.
//   - Fetches of at most 256 KiB per partition (about a thousand
//     records), so that a poll of stream.max_poll_records holds records
//     of several partitions, which process processes in parallel: with
//     8 MiB per partition nearly every poll came from one partition and
//     the stage used one core.
//   - No compression when every broker is on this host: on loopback it
//     costs CPU and saves nothing.
func throughputOpts(brokers []string) []kgo.Opt {
	opts := []kgo.Opt{
		kgo.ProducerLinger(0),
		kgo.MaxBufferedRecords(1 << 17),
		kgo.FetchMaxPartitionBytes(256 << 10),
	}
	local := len(brokers) > 0
	for _, b := range brokers {
		host, _, err := net.SplitHostPort(b)
		if err != nil {
			host = b
		}
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			local = false
		}
	}
	if local {
		opts = append(opts, kgo.ProducerBatchCompression(kgo.NoCompression()))
	}
	return opts
}

// quietLogger demotes franz-go's info logs to debug.
type quietLogger struct{ kgo.Logger }

func (l quietLogger) Log(level kgo.LogLevel, msg string, keyvals ...any) {
	if level == kgo.LogLevelInfo {
		level = kgo.LogLevelDebug
	}
	l.Logger.Log(level, msg, keyvals...)
}

// partitioner writes changelog records to the partition set on the record
// (the input partition of the patient) and everything else by key.
type partitioner struct {
	state string
	keyed kgo.Partitioner
}

func (p partitioner) ForTopic(t string) kgo.TopicPartitioner {
	if t == p.state {
		return kgo.ManualPartitioner().ForTopic(t)
	}
	return p.keyed.ForTopic(t)
}

// runSession runs one consumer-group session until ctx is cancelled (nil,
// after committing) or an error.
func (p *Processor) runSession(ctx context.Context) error {
	sessCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	s := &session{p: p, ctx: sessCtx, parts: map[int32]*partState{}}
	opts := append(p.clientOpts(),
		kgo.ConsumerGroup(p.cfg.Stream.Group),
		kgo.ConsumeTopics(p.cfg.Kafka.Topics.Samples),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.TransactionalID(p.txnID),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		// (The restore replays input up to the committed offsets it read
		// with RequireStable; franz-go's group consumer always fetches
		// them stable too, so it starts from the same ones.)
		kgo.BlockRebalanceOnPoll(),
		kgo.RecordPartitioner(partitioner{state: p.cfg.Kafka.Topics.State, keyed: kgo.StickyKeyPartitioner(nil)}),
		kgo.OnPartitionsAssigned(s.onAssigned),
		kgo.OnPartitionsRevoked(s.onRevoked),
		kgo.OnPartitionsLost(s.onLost),
	)
	if p.cfg.Stream.StaticMembership {
		opts = append(opts, kgo.InstanceID(p.txnID))
	}
	opts = append(opts, throughputOpts(p.cfg.Kafka.Brokers)...)
	sess, err := kgo.NewGroupTransactSession(opts...)
	if err != nil {
		return permanent(fmt.Errorf("creating transactional group session: %w", err))
	}
	s.sess = sess
	if !p.setSession(sess) {
		sess.Close()
		return errClosed
	}
	defer func() {
		p.setSession(nil)
		sess.CloseAllowingRebalance()
		s.mu.Lock()
		s.parts = map[int32]*partState{}
		s.updateGauge()
		for _, w := range s.workers {
			w.out.release()
		}
		if s.timers.w != nil {
			s.timers.w.out.release()
		}
		s.mu.Unlock()
	}()
	p.log.Info("stream processor joining group", "group", p.cfg.Stream.Group, "transactional_id", p.txnID,
		"input", p.cfg.Kafka.Topics.Samples, "changelog", p.cfg.Kafka.Topics.State)
	err = s.loop(ctx)
	if err != nil && s.inTxn {
		// Best effort: abort now rather than leave the transaction to
		// the next session's fencing or the broker's timeout.
		actx, acancel := context.WithTimeout(sessCtx, 10*time.Second)
		_, _ = sess.End(actx, kgo.TryAbort)
		acancel()
	}
	return err
}

// checkpointKey is the changelog key of a partition's checkpoint record:
// its applied_offset is the input offset at or below which every input
// record is reflected in the partition's written states. It cannot clash
// with a patient key ("<tenant>/<patient>", tenant non-empty, no NUL).
const checkpointKey = "\x00checkpoint"

// partState is the state of one owned input partition. Only the goroutine
// processing the partition (the main loop, or the partition's worker
// inside process) touches it.
type partState struct {
	pats map[string]*entry
	// graves are patients whose state was found empty when written: an
	// empty state with its applied offset stands in the changelog until
	// no replay can reach back to it, then a tombstone replaces it.
	graves map[string]int64
	// queue holds the patients with unwritten changes in the order they
	// got them (so the oldest change is at qhead); an item whose entry
	// was written since is stale and skipped.
	queue []pendingRef
	qhead int
	// next is the next input offset to process (the offset the open
	// transaction commits); -1 while unknown.
	next int64
	// checkpoint is the applied offset of the partition's last checkpoint
	// record (-1 when every input record must be replayed, -2 when the
	// changelog has none: written by a version without checkpoints).
	checkpoint int64
	// touched: input of this partition was processed in the open
	// transaction.
	touched bool
}

func newPartState() *partState {
	return &partState{pats: map[string]*entry{}, graves: map[string]int64{}, next: -1, checkpoint: -1}
}

// entry is one patient of a partition with its checkpoint bookkeeping.
type entry struct {
	pt *patient
	// applied is the input offset through which the patient's written
	// (or restored) state reflects input: -1 for a patient that has none.
	applied int64
	// dirtyFrom is the offset of the first input applied since the
	// state was last written; -1 when the written state is current.
	dirtyFrom int64
}

type pendingRef struct {
	e    *entry
	from int64
	at   time.Time
}

// markDirty notes that e changed by the input record at offset.
func (ps *partState) markDirty(e *entry, offset int64, at time.Time) {
	if e.dirtyFrom >= 0 {
		return
	}
	e.dirtyFrom = offset
	if ps.qhead > 1024 && ps.qhead > len(ps.queue)/2 {
		n := copy(ps.queue, ps.queue[ps.qhead:])
		clear(ps.queue[n:])
		ps.queue, ps.qhead = ps.queue[:n], 0
	}
	ps.queue = append(ps.queue, pendingRef{e: e, from: offset, at: at})
}

// oldest returns the oldest unwritten change (skipping stale items).
func (ps *partState) oldest() (pendingRef, bool) {
	for ps.qhead < len(ps.queue) {
		it := ps.queue[ps.qhead]
		if it.e.dirtyFrom == it.from {
			return it, true
		}
		ps.queue[ps.qhead] = pendingRef{}
		ps.qhead++
	}
	return pendingRef{}, false
}

// session is the state of one consumer-group session. The main loop owns
// it; the rebalance callbacks run only between transactions (the session
// blocks rebalances from poll to AllowRebalance) and take mu.
type session struct {
	p    *Processor
	ctx  context.Context // cancelled when the session ends, not with Run's ctx
	sess *kgo.GroupTransactSession

	mu       sync.Mutex
	parts    map[int32]*partState // owned input partition -> its state
	fatal    error                // from a callback, returned by the loop
	inTxn    bool
	begun    time.Time
	deadline time.Time
	promise  *kgo.FirstErrPromise
	workers  []*worker
	// txn-local counts
	nFeatures, nScores, nStates int
	samples, late               int
	nAlerts                     map[vigilv1.AlertEventType]int
	nDeadBy                     map[string]int
	// timers: idle timeout and flush on shutdown (engine.go)
	timers windowTimers
	// alertNext is when alert timers are next checked (alerts.go).
	alertNext time.Time
}

// worker processes the records of one partition of a poll. Its buffers
// are reused between polls.
type worker struct {
	s     *session
	dec   batchDecoder
	batch vigilv1.SampleBatch
	out   outputs
	// counts of the poll, merged into the session's after it
	nFeatures, nScores int
	nAlerts            map[vigilv1.AlertEventType]int
	nDeadBy            map[string]int
	recs               []*kgo.Record
	part               int32
	err                error
}

func (w *worker) resetCounts() {
	w.nFeatures, w.nScores = 0, 0
	w.out.reset()
	clear(w.nAlerts)
	clear(w.nDeadBy)
	w.err = nil
}

func (s *session) loop(ctx context.Context) error {
	cl := s.sess.Client()
	maxPoll := s.p.cfg.Stream.MaxPollRecords
	for {
		if ctx.Err() != nil && !s.inTxn {
			if err := s.closeWindowsOnShutdown(); err != nil {
				return err
			}
			return s.flush()
		}
		pollCtx, cancel := ctx, context.CancelFunc(func() {})
		if s.inTxn {
			pollCtx, cancel = context.WithDeadline(ctx, s.deadline)
		} else if t, ok := s.timerPollDeadline(); ok {
			pollCtx, cancel = context.WithDeadline(ctx, t)
		}
		fetches := s.sess.PollRecords(pollCtx, maxPoll)
		cancel()
		if fetches.IsClientClosed() {
			return errClosed
		}
		fetchFailed := false
		fetches.EachError(func(topic string, part int32, err error) {
			if !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
				fetchFailed = true
				s.p.log.Warn("fetch error", "topic", topic, "partition", part, "err", err)
			}
		})
		if fetchFailed && fetches.NumRecords() == 0 && !s.inTxn {
			// Do not spin on a persistent error (franz-go retries the
			// retriable ones itself).
			s.sess.AllowRebalance()
			select {
			case <-ctx.Done():
			case <-time.After(250 * time.Millisecond):
			}
			continue
		}
		if err := s.takeFatal(); err != nil {
			return err
		}
		if fetches.NumRecords() > 0 {
			if !s.inTxn {
				if err := s.begin(); err != nil {
					return err
				}
			}
			if err := s.process(fetches); err != nil {
				return err
			}
		}
		if s.inTxn && (ctx.Err() != nil || !time.Now().Before(s.deadline) || cl.BufferedFetchRecords() == 0) {
			if err := s.commit(ctx.Err() != nil); err != nil {
				return err
			}
		}
		if !s.inTxn {
			if err := s.expireIdle(); err != nil {
				return err
			}
			if err := s.expireAlertTimers(); err != nil {
				return err
			}
			s.sess.AllowRebalance()
		}
	}
}

// flush writes, on a graceful stop, the states with unwritten changes in
// a last transaction, so that the next owner of the partitions has no input
// to replay.
func (s *session) flush() error {
	s.mu.Lock()
	pending := false
	for _, ps := range s.parts {
		if _, ok := ps.oldest(); ok && ps.next >= 0 {
			pending = true
		}
	}
	s.mu.Unlock()
	if !pending {
		return nil
	}
	if err := s.begin(); err != nil {
		return err
	}
	return s.commit(true)
}

func (s *session) takeFatal() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.fatal
	s.fatal = nil
	return err
}

func (s *session) begin() error {
	if err := s.sess.Begin(); err != nil {
		return fmt.Errorf("beginning transaction: %w", err)
	}
	s.inTxn = true
	s.begun = time.Now()
	s.deadline = s.begun.Add(s.p.cfg.Stream.CommitInterval)
	s.promise = kgo.AbortingFirstErrPromise(s.sess.Client())
	s.nFeatures, s.nScores, s.nStates, s.samples, s.late = 0, 0, 0, 0, 0
	s.nAlerts = map[vigilv1.AlertEventType]int{}
	s.nDeadBy = map[string]int{}
	return nil
}

// process runs the engine over the fetched records and produces the
// outputs into the open transaction. The partitions of the poll are
// processed concurrently (the engine is per patient, a patient belongs to
// one partition, and one goroutine takes a partition's records in order),
// so a patient's outputs keep their order.
func (s *session) process(fetches kgo.Fetches) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.p.clock.Now().UnixMilli()
	var used []*worker
	fetches.EachPartition(func(ftp kgo.FetchTopicPartition) {
		if len(ftp.Records) == 0 {
			return
		}
		for _, w := range used {
			if w.part == ftp.Partition {
				w.recs = append(w.recs, ftp.Records...)
				return
			}
		}
		if len(used) == len(s.workers) {
			s.workers = append(s.workers, &worker{s: s, out: outputs{batched: true}, nAlerts: map[vigilv1.AlertEventType]int{}, nDeadBy: map[string]int{}})
		}
		w := s.workers[len(used)]
		w.part, w.recs = ftp.Partition, append(w.recs[:0], ftp.Records...)
		used = append(used, w)
	})
	for _, w := range used {
		ps := s.parts[w.part]
		if ps == nil {
			return fmt.Errorf("record from %s partition %d, whose state was not restored", w.recs[0].Topic, w.part)
		}
		ps.touched = true
	}
	if len(used) == 1 {
		used[0].run(now)
	} else {
		var wg sync.WaitGroup
		for _, w := range used {
			wg.Go(func() { w.run(now) })
		}
		wg.Wait()
	}
	for _, w := range used {
		clear(w.recs)
		w.recs = w.recs[:0]
		if w.err != nil {
			return w.err
		}
		s.nFeatures += w.nFeatures
		s.nScores += w.nScores
		s.samples += w.out.samples
		s.late += w.out.late
		for k, n := range w.nAlerts {
			s.nAlerts[k] += n
		}
		for k, n := range w.nDeadBy {
			s.nDeadBy[k] += n
		}
	}
	return nil
}

// run processes the worker's records of one partition. The outputs wait
// for the end of the records (engine.finish builds one Arrow record of
// all the features they closed), except dead letters, which refer to the
// decoded batch and are produced before the next record is decoded.
func (w *worker) run(now int64) {
	w.resetCounts()
	s := w.s
	ps := s.parts[w.part]
	for _, r := range w.recs {
		mark := len(w.out.list)
		if e, changed := s.p.applyRecord(ps, r, &w.dec, &w.batch, now, &w.out, false); changed {
			ps.markDirty(e, r.Offset, s.begun)
		}
		ps.next = r.Offset + 1
		kept := w.out.list[:mark]
		for _, o := range w.out.list[mark:] {
			if o.kind != outDeadLetter {
				kept = append(kept, o)
				continue
			}
			if err := w.produce(o); err != nil {
				w.err = err
				return
			}
		}
		clear(w.out.list[len(kept):])
		w.out.list = kept
		if w.out.finishDue() {
			s.p.eng.finish(&w.out)
		}
	}
	s.p.eng.finish(&w.out)
	for _, o := range w.out.list {
		if err := w.produce(o); err != nil {
			w.err = err
			return
		}
	}
	// Produced: the marshalled records are the producer's now, and the
	// feature messages can be reused.
	w.out.recycle()
}

// applyRecord decodes one input record into b (reused: the engine keeps
// no reference to the batch or its samples, and the outputs that do are
// produced before the next record) and applies it to its patient,
// appending the outputs to out. In replay mode a record the
// patient's restored state already reflects is skipped. It returns the
// patient's entry and whether the patient changed.
func (p *Processor) applyRecord(ps *partState, r *kgo.Record, d *batchDecoder, b *vigilv1.SampleBatch, now int64, out *outputs, replay bool) (*entry, bool) {
	// The patient is looked up by key before decoding, so that the
	// decoder takes its id from the entry instead of interning it (one map
	// lookup per record instead of two; the key is checked against the
	// batch below all the same).
	e, ok := ps.pats[string(r.Key)]
	d.patient = ""
	if ok {
		d.patient = e.pt.id
		d.warm += e.pt.warm() // its state's loads overlap the decoding
	}
	err := d.decode(r.Value, b)
	d.patient = ""
	if err != nil {
		out.list = append(out.list, output{kind: outDeadLetter, dl: p.rawDeadLetter(r, "invalid_protobuf",
			fmt.Sprintf("record at %s/%d@%d is not a SampleBatch: %v", r.Topic, r.Partition, r.Offset, err), now)})
		return nil, false
	}
	tenant, id := b.GetTenant(), b.GetPatient()
	if !keyNames(r.Key, tenant, id) || tenant == "" || id == "" {
		want := string(bus.PatientKey(tenant, id))
		b = proto.Clone(b).(*vigilv1.SampleBatch) // the dead letter outlives the reused batch
		dl := deadLetter(b, nil, "key_mismatch", fmt.Sprintf("record key %q does not name the batch's patient %q: state is kept by key", r.Key, want), now)
		dl.Batch.Samples = b.GetSamples()
		out.list = append(out.list, output{kind: outDeadLetter, dl: dl})
		out.samples += len(b.GetSamples())
		return nil, false
	}
	if ok && replay && e.applied >= r.Offset {
		return e, false
	}
	if !ok {
		key := string(r.Key)
		if g, dead := ps.graves[key]; dead {
			if replay && g >= r.Offset {
				return nil, false
			}
			delete(ps.graves, key)
		}
		e = &entry{pt: p.eng.newPatient(key, tenant, id), applied: -1, dirtyFrom: -1}
	}
	if !p.eng.apply(e.pt, b, now, out) {
		return e, false
	}
	if !ok {
		ps.pats[e.pt.key] = e
	}
	return e, true
}

// keyNames reports whether key is PatientKey(tenant, id), without
// building it.
func keyNames(key []byte, tenant, id string) bool {
	return len(key) == len(tenant)+1+len(id) && string(key[:len(tenant)]) == tenant &&
		key[len(tenant)] == '/' && string(key[len(tenant)+1:]) == id
}

// rawDeadLetter is the dead letter of an undecodable record.
func (p *Processor) rawDeadLetter(r *kgo.Record, reason, msg string, now int64) *vigilv1.DeadLetter {
	raw := r.Value
	limit := p.cfg.Ingest.DeadLetterRawLimit
	trunc := len(raw) > limit
	if trunc {
		raw = raw[:limit]
	}
	return &vigilv1.DeadLetter{SchemaVersion: 1, Reason: reason, Message: msg, Origin: "stream",
		Raw: raw, RawSize: uint64(len(r.Value)), RawTruncated: trunc, RefusedTimeMs: now,
		ContentType: "application/x-protobuf; messageType=vigil.v1.SampleBatch"}
}

// produce marshals one output and produces it into the transaction. It
// may run concurrently with other workers' produce calls.
func (w *worker) produce(o output) error {
	topics := w.s.p.cfg.Kafka.Topics
	var (
		topic string
		key   []byte
		msg   proto.Message
	)
	switch o.kind {
	case outFeatures:
		topic, msg = topics.Features, o.fw
		w.nFeatures++
	case outScore:
		topic, msg = topics.Scores, o.score
		w.nScores++
	case outAlert:
		topic, msg = topics.Alerts, o.alert
		w.nAlerts[o.alert.GetType()]++
	case outDeadLetter:
		topic, key, msg = topics.DeadLetter, []byte(sourceName(o.dl.GetSource())), o.dl
		w.nDeadBy[o.dl.GetReason()]++
	}
	sl := &w.out.slab
	val := o.val // encoded already
	if val == nil {
		var err error
		val, err = sl.put(func(b []byte) ([]byte, error) {
			switch o.kind {
			case outFeatures:
				return window.AppendFeatureWindow(b, o.fw), nil
			case outScore:
				return appendScore(b, o.score), nil
			}
			return proto.MarshalOptions{Deterministic: true}.MarshalAppend(b, msg)
		})
		if err != nil {
			return fmt.Errorf("encoding %s record: %w", topic, err)
		}
	}
	if o.kind != outDeadLetter {
		key, _ = sl.put(func(b []byte) ([]byte, error) { return append(b, o.key...), nil })
	}
	w.s.sess.Produce(w.s.ctx, sl.record(topic, key, val), w.s.promise.Promise())
	return nil
}

// slabSize and slabRecords are the sizes of the chunks a slab hands out.
const (
	slabSize    = 256 << 10
	slabRecords = 256
)

// slab hands out the memory of produced records (values, keys, the
// kgo.Records themselves) from shared chunks instead of one allocation
// each. Nothing handed out is written again: the producer owns a record
// until its promise runs, and a chunk is garbage once all its records
// are. Not safe for concurrent use: each worker has its own.
type slab struct {
	buf  []byte
	recs []kgo.Record
}

// put appends, with enc, one value to the chunk (or a new one) and
// returns it, capped so that no later append can reach it.
func (sl *slab) put(enc func([]byte) ([]byte, error)) ([]byte, error) {
	free := sl.buf[len(sl.buf):]
	v, err := enc(free)
	if err != nil {
		return nil, err
	}
	if len(v) > cap(free) { // did not fit: enc allocated v
		if len(v) > slabSize/8 {
			return v, nil
		}
		sl.buf = append(make([]byte, 0, slabSize), v...)
		return sl.buf[:len(v):len(v)], nil
	}
	sl.buf = sl.buf[:len(sl.buf)+len(v)]
	return v[:len(v):len(v)], nil
}

func (sl *slab) record(topic string, key, val []byte) *kgo.Record {
	if len(sl.recs) == 0 {
		sl.recs = make([]kgo.Record, slabRecords)
	}
	r := &sl.recs[0]
	sl.recs = sl.recs[1:]
	r.Topic, r.Key, r.Value = topic, key, val
	return r
}

// checkpoint writes, into the open transaction, the state of the patients
// whose oldest unwritten change is older than stream.checkpoint_interval
// (all of them when all is set: the last transaction before a stop), the
// partitions' checkpoint records and the tombstones of emptied patients.
// Every partition whose offsets the transaction commits gets its
// checkpoint record, so that a changelog partition without an open
// transaction also means no pending offsets for its input partition.
// s.mu must be held.
func (s *session) checkpoint(all bool) error {
	topic := s.p.cfg.Kafka.Topics.State
	cutoff := s.begun.Add(-s.p.cfg.Stream.CheckpointInterval)
	if s.p.cfg.Stream.CheckpointInterval == 0 {
		all = true
	}
	write := func(part int32, key string, ps *vigilv1.PatientState) error {
		var val []byte
		if ps != nil {
			var err error
			if val, err = encode(ps); err != nil {
				return fmt.Errorf("encoding changelog record %q: %w", key, err)
			}
		}
		s.sess.Produce(s.ctx, &kgo.Record{Topic: topic, Partition: part, Key: []byte(key), Value: val}, s.promise.Promise())
		return nil
	}
	for part, ps := range s.parts {
		if ps.next < 0 {
			continue // nothing processed or committed yet
		}
		applied := ps.next - 1
		wrote := false
		// Spread the writes: patients dirtied together (every bed's
		// samples arrive each second) would otherwise all come due in
		// the same transaction, whose encoding and produce then hold up
		// the alerts behind it. Each transaction writes at most twice
		// its share of the partition's patients per checkpoint interval
		// (a patient is still written within about two intervals).
		limit := -1
		if !all && s.p.cfg.Stream.CheckpointInterval > 0 {
			limit = 2*int(int64(len(ps.pats))*int64(s.p.cfg.Stream.CommitInterval)/int64(s.p.cfg.Stream.CheckpointInterval)) + 16
		}
		for n := 0; n != limit; n++ {
			it, ok := ps.oldest()
			if !ok || (!all && it.at.After(cutoff)) {
				break
			}
			e := it.e
			e.applied, e.dirtyFrom = applied, -1
			var st *vigilv1.PatientState
			if e.pt.empty() {
				st = &vigilv1.PatientState{SchemaVersion: 1, Tenant: e.pt.tenant, Patient: e.pt.id}
				delete(ps.pats, e.pt.key)
				ps.graves[e.pt.key] = applied
			} else {
				st = e.pt.toProto()
			}
			st.AppliedOffset = applied
			if err := write(part, e.pt.key, st); err != nil {
				return err
			}
			s.nStates++
			wrote = true
		}
		mark := applied
		if it, ok := ps.oldest(); ok {
			mark = it.from - 1
		}
		if ps.touched || wrote || mark != ps.checkpoint {
			if err := write(part, checkpointKey, &vigilv1.PatientState{SchemaVersion: 1, AppliedOffset: mark}); err != nil {
				return err
			}
			ps.checkpoint = mark
		}
		for key, g := range ps.graves {
			if g <= mark { // no replay reaches back to it: remove the key
				if err := write(part, key, nil); err != nil {
					return err
				}
				delete(ps.graves, key)
			}
		}
	}
	return nil
}

// commit writes the due checkpoints and ends the transaction. An abort
// rolls the owned partitions' state back to the changelog (and the input
// replay since its checkpoint); an End error ends the session.
func (s *session) commit(all bool) error {
	s.mu.Lock()
	err := s.checkpoint(all)
	s.mu.Unlock()
	if err != nil {
		return err
	}

	start := time.Now()
	perr := s.promise.Err()
	if h := s.p.hookBeforeEnd; h != nil {
		h()
	}
	endCtx, cancel := context.WithTimeout(s.ctx, s.p.cfg.Kafka.ProduceTimeout+30*time.Second)
	committed, err := s.sess.End(endCtx, kgo.TransactionEndTry(perr == nil))
	cancel()
	s.inTxn = false
	s.p.m.commitTime.Observe(time.Since(start).Seconds())
	s.mu.Lock()
	for _, ps := range s.parts {
		ps.touched = false
	}
	s.mu.Unlock()
	if err != nil {
		if errors.Is(err, kerr.ProducerFenced) || errors.Is(err, kerr.InvalidProducerEpoch) || errors.Is(err, kerr.TransactionalIDAuthorizationFailed) {
			return permanent(fmt.Errorf("ending transaction (is another processor running with transactional id %s?): %w", s.p.txnID, err))
		}
		return fmt.Errorf("ending transaction: %w", err)
	}
	if !committed {
		s.p.m.aborts.Inc()
		s.p.log.Info("transaction aborted; rolling state back to the changelog", "produce_err", perr)
		if perr != nil {
			// A record that cannot be produced fails again when redone:
			// let the session restart with backoff.
			return fmt.Errorf("producing in transaction: %w", perr)
		}
		return s.rollback()
	}
	m := s.p.m
	m.transactions.Inc()
	m.samples.Add(float64(s.samples))
	m.late.Add(float64(s.late))
	m.features.Add(float64(s.nFeatures))
	m.scores.Add(float64(s.nScores))
	m.statesWritten.Add(float64(s.nStates))
	for t, n := range s.nAlerts {
		m.alerts.WithLabelValues(t.Label()).Add(float64(n))
	}
	for r, n := range s.nDeadBy {
		m.deadLetters.WithLabelValues(r).Add(float64(n))
	}
	if s.late > 0 {
		s.p.log.Debug("late samples sent to dead letters", "count", s.late)
	}
	s.mu.Lock()
	s.updateGauge()
	s.mu.Unlock()
	return nil
}

// rollback rebuilds the state of every owned partition from the changelog
// and the input since its checkpoint, after an abort rewound the input (an
// aborted transaction may have carried checkpoints of any partition).
func (s *session) rollback() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	parts := make([]int32, 0, len(s.parts))
	for p := range s.parts {
		parts = append(parts, p)
	}
	return s.restoreLocked(s.ctx, s.sess.Client(), parts)
}

// onAssigned restores the state of newly assigned partitions. It first
// loads the producer id: initialising the transactional id fences a
// crashed predecessor with the same instance id and aborts its open
// transaction at once, instead of leaving the changelog (and the group's
// pending offsets) blocked until the broker's transaction timeout.
func (s *session) onAssigned(ctx context.Context, cl *kgo.Client, assigned map[string][]int32) {
	parts := assigned[s.p.cfg.Kafka.Topics.Samples]
	if len(parts) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	pctx, cancel := context.WithTimeout(ctx, restoreTimeout)
	_, _, err := cl.ProducerID(pctx)
	cancel()
	if err != nil {
		err = fmt.Errorf("initialising transactional id %s: %w", s.p.txnID, err)
	} else {
		err = s.restoreLocked(ctx, cl, parts)
	}
	if err != nil && s.fatal == nil {
		s.fatal = err
	}
}

func (s *session) onRevoked(_ context.Context, _ *kgo.Client, revoked map[string][]int32) {
	s.drop(revoked[s.p.cfg.Kafka.Topics.Samples], "revoked")
}

func (s *session) onLost(_ context.Context, _ *kgo.Client, lost map[string][]int32) {
	s.drop(lost[s.p.cfg.Kafka.Topics.Samples], "lost")
}

func (s *session) drop(parts []int32, why string) {
	if len(parts) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range parts {
		delete(s.parts, p)
	}
	s.updateGauge()
	s.p.log.Info("partitions "+why+"; state dropped", "partitions", parts)
}

// updateGauge sets the patients gauge; mu must be held.
func (s *session) updateGauge() {
	n := 0
	for _, ps := range s.parts {
		n += len(ps.pats)
	}
	s.p.m.patients.Set(float64(n))
}
