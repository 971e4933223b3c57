package sepsis2019

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/broker"
	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	"github.com/vigilhealth/vigil/stream"
)

// Score kinds the validation reads (besides "model:<name>").
const (
	KindNEWS2 = "news2"
	KindMEWS  = "mews"
	KindQSOFA = "qsofa"
)

// modelPrefix starts the kind of a model's scores.
const modelPrefix = "model:"

// PipelineOptions configure RunPipeline.
type PipelineOptions struct {
	// Config is the base configuration (stream windows, scores, models,
	// kafka partitions...). RunPipeline overrides what makes the run
	// self-contained: an embedded broker on a free port with its data in a
	// temporary folder (kafka.brokers is ignored), the stream instance id,
	// and the staleness of score inputs (stream.staleness and
	// detectors.scores.staleness effectively infinite, see
	// StalenessForever; detectors.scores.limits cleared).
	Config config.Config
	// Tenant of the samples (default "physionet").
	Tenant string
	// Lanes is the number of concurrent publishers (default 4); one
	// patient's rows are always published in order by one call.
	Lanes int
	// Log receives progress and stage logs (default: discarded).
	Log *slog.Logger
	// Progress, when set, is called after each published chunk with the
	// patients published so far; from one goroutine at a time.
	Progress func(published, total int)
}

// StalenessForever is the score-input staleness of a validation run: the
// challenge's rows are charted hourly and sparsely (a temperature every 4 h
// or less often), and the challenge's convention is to carry the last value
// forward for the whole stay, so no input is ever too old to score.
const StalenessForever = 1_000_000 * time.Hour

// PipelineResult is what RunPipeline measured.
type PipelineResult struct {
	// Kinds are the score kinds received, sorted.
	Kinds []string
	// Scores holds, per kind, one value per input row (patients in the
	// order given, rows in file order): the newest score of that kind whose
	// event time is at or before the row's time, NaN when there was none.
	Scores map[string][]float64
	// Samples, Batches: what was published; Refused counts refused values
	// by reason (they went to the dead-letter topic).
	Samples, Batches int64
	Refused          map[string]int
	// Received counts the scores read per kind.
	Received map[string]int
	Elapsed  time.Duration
}

// scoreRec is one received score, compact (the full set B yields
// millions): its event time in seconds after admission, rounded up (so
// "at or before a row's time" stays exact for whole-hour rows), its kind
// index and value (float32 holds EWS points exactly and a model's float32
// output unchanged).
type scoreRec struct {
	sec  int32
	kind uint8
	val  float32
}

// collector reads the scores topic; safe for concurrent use.
type collector struct {
	mu      sync.Mutex
	byID    map[string]int
	recs    [][]scoreRec
	kinds   []string
	kindIdx map[string]uint8
	next    map[int32]int64 // per partition: offset after the newest record seen
	unknown int
	err     error
}

func (c *collector) add(r *kgo.Record, admissionMs int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.next[r.Partition] = max(c.next[r.Partition], r.Offset+1)
	if r.Attrs.IsControl() {
		return
	}
	var s vigilv1.Score
	if err := proto.Unmarshal(r.Value, &s); err != nil {
		if c.err == nil {
			c.err = fmt.Errorf("decoding score at partition %d offset %d: %w", r.Partition, r.Offset, err)
		}
		return
	}
	k := s.GetKind()
	if k != KindNEWS2 && k != KindMEWS && k != KindQSOFA && !strings.HasPrefix(k, modelPrefix) {
		return
	}
	i, ok := c.byID[s.GetPatient()]
	if !ok {
		c.unknown++
		return
	}
	ki, ok := c.kindIdx[k]
	if !ok {
		if len(c.kinds) == math.MaxUint8 {
			return
		}
		ki = uint8(len(c.kinds))
		c.kinds = append(c.kinds, k)
		c.kindIdx[k] = ki
	}
	sec := math.Ceil(float64(s.GetEventTimeMs()-admissionMs) / 1000)
	c.recs[i] = append(c.recs[i], scoreRec{sec: int32(max(min(sec, math.MaxInt32), math.MinInt32)), kind: ki, val: float32(s.GetValue())})
}

// caughtUp reports whether every partition in ends has been read to its end.
func (c *collector) caughtUp(ends map[int32]int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for p, end := range ends {
		if c.next[p] < end {
			return false
		}
	}
	return true
}

// RunPipeline replays the patients' canonical rows through the real
// pipeline in this process: an embedded broker (kfake, as `vigil run`
// starts it), the stream stage (package stream, with the detectors the
// configuration enables), and ingest's publisher, which publishes per
// patient one batch with the consciousness sample at admission, then one
// batch per row with that row's accepted samples (values that validation
// refused go to the dead-letter topic). It reads every score from the
// scores topic until the stream stage has committed all the input and
// returns, per kind and input row, the newest score at or before the row's
// event time. It blocks until done or ctx ends and stops everything it
// started before returning.
func RunPipeline(ctx context.Context, pts []*Canonical, o PipelineOptions) (*PipelineResult, error) {
	began := time.Now()
	if o.Tenant == "" {
		o.Tenant = "physionet"
	}
	if o.Lanes <= 0 {
		o.Lanes = 4
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	cfg := o.Config
	dir, err := os.MkdirTemp("", "vigil-sepsis2019-")
	if err != nil {
		return nil, fmt.Errorf("creating the run folder: %w", err)
	}
	defer os.RemoveAll(dir)
	cfg.DataDir = dir
	configure(&cfg)
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("validation config: %w", err)
	}
	brk, err := broker.Start(broker.Options{Listen: "127.0.0.1:0", DataDir: filepath.Join(dir, "kafka"),
		Partitions: int(cfg.Kafka.Partitions), Log: o.Log})
	if err != nil {
		return nil, err
	}
	defer brk.Close(context.Background())
	cfg.Kafka.Brokers = []string{brk.Addr()}
	admin, err := kgo.NewClient(bus.ClientOpts(cfg.Kafka, o.Log)...)
	if err != nil {
		return nil, fmt.Errorf("creating kafka admin client: %w", err)
	}
	defer admin.Close()
	adm := kadm.NewClient(admin)
	tctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = bus.EnsureTopics(tctx, admin, cfg.Kafka)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("preparing topics: %w", err)
	}

	reg := prometheus.NewRegistry()
	deps := func(name string) stage.Deps {
		return stage.Deps{Log: o.Log.With("stage", name), Metrics: reg, Clock: clock.System{}}
	}
	proc, err := stream.New(cfg, deps("stream"))
	if err != nil {
		return nil, fmt.Errorf("creating stream processor: %w", err)
	}
	runCtx, stopStream := context.WithCancel(context.Background())
	streamDone := make(chan error, 1)
	go func() { streamDone <- proc.Run(runCtx) }()
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		stopStream()
		err := <-streamDone
		return errors.Join(err, proc.Close(context.Background()))
	}
	defer stop()

	col := &collector{byID: make(map[string]int, len(pts)), recs: make([][]scoreRec, len(pts)),
		kindIdx: map[string]uint8{}, next: map[int32]int64{}}
	for i, c := range pts {
		if _, dup := col.byID[c.Patient.ID]; dup {
			return nil, fmt.Errorf("patient %s given twice", c.Patient.ID)
		}
		col.byID[c.Patient.ID] = i
	}
	admMs := Admission().UnixMilli()
	cons, err := kgo.NewClient(append(bus.ClientOpts(cfg.Kafka, o.Log),
		kgo.ConsumeTopics(cfg.Kafka.Topics.Scores), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.KeepControlRecords())...)
	if err != nil {
		return nil, fmt.Errorf("creating score consumer: %w", err)
	}
	consCtx, stopCons := context.WithCancel(context.Background())
	consDone := make(chan struct{})
	go func() {
		defer close(consDone)
		for consCtx.Err() == nil {
			fs := cons.PollFetches(consCtx)
			fs.EachError(func(t string, p int32, err error) {
				if !errors.Is(err, context.Canceled) {
					o.Log.Warn("sepsis2019: reading scores", "topic", t, "partition", p, "err", err)
				}
			})
			fs.EachRecord(func(r *kgo.Record) { col.add(r, admMs) })
		}
	}()
	defer func() { stopCons(); <-consDone; cons.Close() }()

	pub, err := publish.New(cfg, deps("ingest"))
	if err != nil {
		return nil, fmt.Errorf("creating ingest publisher: %w", err)
	}
	defer pub.Close(context.Background())
	res := &PipelineResult{Refused: map[string]int{}, Received: map[string]int{}}
	if err := publishAll(ctx, pub, pts, o, res); err != nil {
		return nil, err
	}
	o.Log.Info("sepsis2019: published", "patients", len(pts), "batches", res.Batches, "elapsed", time.Since(began))
	if err := waitCommitted(ctx, adm, cfg, col); err != nil {
		return nil, err
	}
	o.Log.Info("sepsis2019: stream stage caught up, scores read", "elapsed", time.Since(began))
	if err := stop(); err != nil {
		return nil, fmt.Errorf("stopping the stream stage: %w", err)
	}
	stopCons()
	<-consDone
	col.mu.Lock()
	defer col.mu.Unlock()
	if col.err != nil {
		return nil, col.err
	}
	if col.unknown > 0 {
		o.Log.Warn("sepsis2019: scores of unknown patients ignored", "count", col.unknown)
	}
	resolve(pts, col, res)
	res.Elapsed = time.Since(began)
	return res, nil
}

// configure sets what a validation run needs on cfg (see
// PipelineOptions.Config).
func configure(cfg *config.Config) {
	cfg.Stream.InstanceID = "sepsis2019"
	cfg.Stream.Staleness = StalenessForever
	cfg.Detectors.Scores.Staleness = StalenessForever
	cfg.Detectors.Scores.Limits = nil
	cfg.Status.Interval = 0
	// No idle timeout: a patient's last window stays open, so that what
	// is scored does not depend on how fast the run goes (processing
	// time).
	cfg.Stream.Windows.IdleTimeout = 0
}

// publishAll publishes the patients through lanes of the publisher.
func publishAll(ctx context.Context, pub *publish.Publisher, pts []*Canonical, o PipelineOptions, res *PipelineResult) error {
	const chunk = 16 // patients per Publish call
	work := make(chan []*Canonical)
	var (
		wg                sync.WaitGroup
		samples, batches  atomic.Int64
		published         atomic.Int64
		mu                sync.Mutex
		firstErr          error
		progressMu        sync.Mutex
		lctx, cancelLanes = context.WithCancel(ctx)
	)
	defer cancelLanes()
	fail := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
		cancelLanes()
	}
	for range o.Lanes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for cs := range work {
				var bs []*vigilv1.SampleBatch
				var dls []*vigilv1.DeadLetter
				nowMs := time.Now().UnixMilli()
				for _, c := range cs {
					bs, dls = appendPatient(bs, dls, c, o.Tenant, nowMs)
				}
				n := 0
				for _, b := range bs {
					n += len(b.Samples)
				}
				if err := pub.Publish(lctx, bs); err != nil {
					fail(fmt.Errorf("publishing samples: %w", err))
					return
				}
				if len(dls) > 0 {
					if err := pub.DeadLetter(lctx, dls); err != nil {
						fail(fmt.Errorf("publishing dead letters: %w", err))
						return
					}
				}
				samples.Add(int64(n))
				batches.Add(int64(len(bs)))
				done := published.Add(int64(len(cs)))
				if o.Progress != nil {
					progressMu.Lock()
					o.Progress(int(done), len(pts))
					progressMu.Unlock()
				}
			}
		}()
	}
send:
	for i := 0; i < len(pts); i += chunk {
		select {
		case work <- pts[i:min(i+chunk, len(pts))]:
		case <-lctx.Done():
			break send
		}
	}
	close(work)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	for _, c := range pts {
		for _, r := range c.Refused {
			res.Refused[string(r.Refusal.Reason)]++
		}
	}
	res.Samples, res.Batches = samples.Load(), batches.Load()
	return nil
}

// appendPatient appends c's batches (admission, then one per row with
// samples) and the dead letters of its refused values.
func appendPatient(bs []*vigilv1.SampleBatch, dls []*vigilv1.DeadLetter, c *Canonical, tenant string, nowMs int64) ([]*vigilv1.SampleBatch, []*vigilv1.DeadLetter) {
	id := c.Patient.ID
	batch := func(row int, ss []Sample) *vigilv1.SampleBatch {
		b := &vigilv1.SampleBatch{SchemaVersion: publish.SchemaVersion, Tenant: tenant, Patient: id, Device: Device,
			Source: vigilv1.Source_SOURCE_REPLAY, MessageId: "sepsis2019-" + id + "-" + strconv.Itoa(row),
			Samples: make([]*vigilv1.Sample, len(ss))}
		for i, s := range ss {
			b.Samples[i] = &vigilv1.Sample{Metric: s.Metric, Value: s.Value, Unit: s.Unit, EventTimeMs: s.TimeMs,
				Sequence: uint64(row)}
		}
		return b
	}
	bs = append(bs, batch(0, []Sample{c.Admission}))
	for i, ss := range c.Rows {
		if len(ss) > 0 {
			bs = append(bs, batch(i+1, ss))
		}
	}
	for _, r := range c.Refused {
		dls = append(dls, &vigilv1.DeadLetter{SchemaVersion: publish.SchemaVersion, Reason: string(r.Refusal.Reason),
			Message: r.Refusal.Message, Source: vigilv1.Source_SOURCE_REPLAY, Field: r.Column,
			Origin: id + ".psv line " + strconv.Itoa(r.Row+2), RefusedTimeMs: nowMs, Tenant: tenant, Patient: id, Device: Device,
			MessageId: "sepsis2019-" + id + "-" + strconv.Itoa(r.Row+1)})
	}
	return bs, dls
}

// NewValidator returns ingest's validator over the embedded catalogue with
// the limits of cfg.Ingest.
func NewValidator(cfg config.Config) *validate.Validator {
	return validate.New(catalog.Default(), validate.LimitsFrom(cfg.Ingest))
}

// waitCommitted waits until the stream stage's consumer group has
// committed every input record (its outputs are committed in the same
// transactions), then until the collector has read the scores topic to
// its end.
func waitCommitted(ctx context.Context, adm *kadm.Client, cfg config.Config, col *collector) error {
	ends, err := adm.ListEndOffsets(ctx, cfg.Kafka.Topics.Samples)
	if err != nil {
		return fmt.Errorf("listing the end of %s: %w", cfg.Kafka.Topics.Samples, err)
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		done := true
		offs, err := adm.FetchOffsets(ctx, cfg.Stream.Group)
		if err != nil {
			done = false
		}
		ends.Each(func(l kadm.ListedOffset) {
			if l.Offset == 0 || !done {
				return
			}
			c, ok := offs.Lookup(l.Topic, l.Partition)
			if !ok || c.At < l.Offset {
				done = false
			}
		})
		if done {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the stream stage to process the input: %w", ctx.Err())
		case <-tick.C:
		}
	}
	sends, err := adm.ListEndOffsets(ctx, cfg.Kafka.Topics.Scores)
	if err != nil {
		return fmt.Errorf("listing the end of %s: %w", cfg.Kafka.Topics.Scores, err)
	}
	want := map[int32]int64{}
	sends.Each(func(l kadm.ListedOffset) { want[l.Partition] = l.Offset })
	for !col.caughtUp(want) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the scores: %w", ctx.Err())
		case <-tick.C:
		}
	}
	return nil
}

// resolve fills res.Scores: per kind and row, the newest score at or
// before the row's time.
func resolve(pts []*Canonical, col *collector, res *PipelineResult) {
	nrows := 0
	for _, c := range pts {
		nrows += len(c.Patient.Rows)
	}
	vals := make([][]float64, len(col.kinds))
	for k := range vals {
		vals[k] = make([]float64, 0, nrows)
	}
	cur := make([]float64, len(col.kinds))
	for i, c := range pts {
		recs := col.recs[i]
		// Stable: scores of one time keep their arrival order, the
		// later one winning.
		slices.SortStableFunc(recs, func(a, b scoreRec) int { return int(a.sec) - int(b.sec) })
		for k := range cur {
			cur[k] = math.NaN()
		}
		j := 0
		for _, r := range c.Patient.Rows {
			sec := int32(r.ICULOS) * 3600
			for ; j < len(recs) && recs[j].sec <= sec; j++ {
				cur[recs[j].kind] = float64(recs[j].val)
			}
			for k := range vals {
				vals[k] = append(vals[k], cur[k])
			}
		}
		for _, r := range recs {
			res.Received[col.kinds[r.kind]]++
		}
	}
	res.Scores = map[string][]float64{}
	for k, name := range col.kinds {
		res.Scores[name] = vals[k]
	}
	res.Kinds = slices.Sorted(slices.Values(col.kinds))
}
