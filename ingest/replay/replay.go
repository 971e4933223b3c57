// Package replay feeds recorded data through Vigil's real ingest into Kafka
// (`vigil replay`): the simulator's recordings, PhysioNet 2019 sepsis PSV
// files (a folder of them or a .tar.gz, streamed, never unpacked to disk)
// and WFDB waveform records.
//
// # Recording format
//
// A recording is JSON Lines: one line per POST /v1/samples request body,
// exactly as the HTTP API takes it (see ingest/httpjson), so that a
// recording can also be replayed with curl:
//
//	while read -r l; do curl -sS -H 'Content-Type: application/json' -d "$l" localhost:8080/v1/samples; done < rec.jsonl
//
// A name ending in .gz is gzip-compressed (.jsonl.gz). `vigil simulate
// --record FILE` writes one.
//
// # PSV
//
// Each row of a challenge file is one ICU hour of one patient. The vital
// columns (PSVVitals) become samples of tenant Options.Tenant, patient = the
// file name's stem (p100001), device "psv", event time Options.Start +
// (ICULOS−1) hours, sequence = the row number; NaN cells are skipped;
// laboratory values and EtCO2 (no catalogue metric) are counted in Stats,
// not sent. One row is one sample batch with message id
// "replay-<stem>-<row>", so that replaying the same input twice produces
// the same batches.
//
// # Path through ingest
//
// In process (the default), every sample is checked by ingest/validate
// exactly as on the HTTP path and published through ingest/publish with
// source SOURCE_REPLAY; refusals become dead letters. With Options.Target,
// the replayer instead posts request bodies to a running Vigil's
// POST /v1/samples (source SOURCE_HTTP there).
//
// Publishing is pipelined: batches are spread over Options.Lanes lanes by
// patient (so one patient's batches stay in order), each lane publishing
// one flight at a time, with the bytes of all flights in flight bounded by
// Options.MaxInFlightBytes.
package replay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"math"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/ingest/waveform"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// DefaultStart is the event time of ICU hour 1 of every PSV file when
// Options.Start is zero: fixed, so that two replays are identical.
func DefaultStart() time.Time { return time.Date(2019, 1, 1, 0, 0, 0, 0, time.UTC) }

// Options configure a Replayer. Zero values take the defaults named.
type Options struct {
	// Tenant of PSV and WFDB data (default "physionet"); recordings carry
	// their own.
	Tenant string
	// Start is the event time of PSV ICU hour 1 and of a WFDB record's
	// first sample when its header has no base date (default DefaultStart()).
	Start time.Time
	// Speed plays X× real time by event time; 0 is full speed.
	Speed float64
	// Target is a running Vigil's base URL (http://host:port): post to its
	// POST /v1/samples instead of publishing in process.
	Target string
	// Lanes is the number of concurrent publishers (default 4).
	Lanes int
	// FlightBytes closes a lane's flight at about this many encoded bytes
	// (default 256 KiB).
	FlightBytes int
	// MaxInFlightBytes bounds the bytes of all flights not yet
	// acknowledged (default 32 MiB); reading waits when it is reached.
	MaxInFlightBytes int64
	// ChunkSeconds is the length of the waveform chunks of a WFDB record
	// (default 10 s).
	ChunkSeconds float64
	// Waveform receives WFDB chunks. In process, nil makes New create a
	// waveform.Processor publishing through the replay's publisher (limits
	// from cfg.Waveform); with Target, chunks are posted to the target's
	// POST /v1/waveforms instead and Waveform is ignored.
	Waveform waveform.Sink
	// MaxFiles stops the replay after this many input files (PSV files,
	// recordings, WFDB records; a tarball's entries count one each), so
	// that a subset of a large archive can be played without unpacking
	// it; 0 replays everything.
	MaxFiles int64
	// Progress, when set, receives a progress bar (see NewProgress).
	Progress *Progress
}

func (o *Options) defaults() error {
	if o.Tenant == "" {
		o.Tenant = "physionet"
	}
	if o.Start.IsZero() {
		o.Start = DefaultStart()
	}
	if o.Lanes <= 0 {
		o.Lanes = 4
	}
	if o.FlightBytes <= 0 {
		o.FlightBytes = 256 << 10
	}
	if o.MaxInFlightBytes <= 0 {
		o.MaxInFlightBytes = 32 << 20
	}
	if o.MaxInFlightBytes < int64(o.FlightBytes) {
		o.MaxInFlightBytes = int64(o.FlightBytes)
	}
	if o.ChunkSeconds <= 0 {
		o.ChunkSeconds = 10
	}
	if o.Speed < 0 || math.IsNaN(o.Speed) || math.IsInf(o.Speed, 0) {
		return errors.New("replay speed must be a finite number ≥ 0")
	}
	if o.MaxFiles < 0 {
		return errors.New("replay max files must not be negative")
	}
	if rf := validate.CheckIDs(o.Tenant, "x", "x"); rf != nil {
		return fmt.Errorf("replay tenant: %w", rf)
	}
	if o.Target != "" && !strings.HasPrefix(o.Target, "http://") && !strings.HasPrefix(o.Target, "https://") {
		return fmt.Errorf("replay target %q is not an http(s) URL", o.Target)
	}
	return nil
}

// Stats count what a replay read and what became of it. Safe to read with
// Snapshot while a replay runs.
type Stats struct {
	// Files are input files read (PSV files, recordings, WFDB records).
	Files int64
	// Rows are messages read: PSV rows, recording lines, waveform chunks.
	Rows int64
	// Samples were accepted (acknowledged by Kafka, or by the target);
	// for WFDB input, the waveform values the waveform processor took.
	Samples int64
	// Refused samples (and whole messages) went to the dead-letter topic.
	Refused int64
	// Batches are sample batches (records) acknowledged.
	Batches int64
	// Labs are non-empty PSV laboratory cells (not vitals: skipped).
	Labs int64
	// Unmapped are non-empty PSV vital cells without a catalogue metric
	// (EtCO2): skipped.
	Unmapped int64
	// Skipped are files of the input that are not a known format.
	Skipped int64
	// Bytes of input read (compressed, as stored).
	Bytes int64
	// SkippedSignals are WFDB signals that are not an ECG (their unit is
	// not a voltage): not replayed.
	SkippedSignals int64
}

type stats struct {
	files, rows, samples, refused, batches, labs, unmapped, skipped, bytes, skippedSignals atomic.Int64
}

func (s *stats) snapshot() Stats {
	return Stats{Files: s.files.Load(), Rows: s.rows.Load(), Samples: s.samples.Load(), Refused: s.refused.Load(),
		Batches: s.batches.Load(), Labs: s.labs.Load(), Unmapped: s.unmapped.Load(), Skipped: s.skipped.Load(),
		Bytes: s.bytes.Load(), SkippedSignals: s.skippedSignals.Load()}
}

// Publisher is what the replayer needs from publish.Publisher.
type Publisher interface {
	Publish(ctx context.Context, batches []*vigilv1.SampleBatch) error
	DeadLetter(ctx context.Context, letters []*vigilv1.DeadLetter) error
}

// Replayer replays inputs. Run it once at a time; Close it when done.
type Replayer struct {
	opts  Options
	log   *slog.Logger
	clock clock.Clock
	val   *validate.Validator
	pub   Publisher
	// own is the publisher New created (closed by Close).
	own    *publish.Publisher
	client *http.Client
	// url and waveURL are the target's POST /v1/samples and
	// POST /v1/waveforms.
	url, waveURL string
	// maxChunk bounds the values of one waveform chunk
	// (waveform.max_chunk_samples).
	maxChunk int
	st       stats

	closeOnce sync.Once
	closeErr  error
}

// New creates a Replayer. In process (opts.Target empty) it creates a
// publish.Publisher for cfg.Kafka unless pub is given; it contacts nothing.
func New(cfg config.Config, deps stage.Deps, opts Options, pub Publisher) (*Replayer, error) {
	deps = deps.WithDefaults()
	if err := opts.defaults(); err != nil {
		return nil, fmt.Errorf("creating replayer: %w", err)
	}
	cat, err := catalog.Load(cfg.Ingest.Catalog)
	if err != nil {
		return nil, fmt.Errorf("creating replayer: %w", err)
	}
	r := &Replayer{opts: opts, log: deps.Log, clock: deps.Clock, val: validate.New(cat, validate.LimitsFrom(cfg.Ingest)), pub: pub,
		maxChunk: max(cfg.Waveform.MaxChunkSamples, 1)}
	if opts.Target != "" {
		r.url = strings.TrimRight(opts.Target, "/") + httpjson.Path
		r.waveURL = strings.TrimRight(opts.Target, "/") + waveform.Path
		r.client = &http.Client{Timeout: cfg.Kafka.ProduceTimeout + 30*time.Second,
			Transport: &http.Transport{MaxIdleConnsPerHost: opts.Lanes, IdleConnTimeout: 30 * time.Second}}
		return r, nil
	}
	if r.pub == nil {
		p, err := publish.New(cfg, deps)
		if err != nil {
			return nil, fmt.Errorf("creating replayer: %w", err)
		}
		r.own, r.pub = p, p
	}
	if r.opts.Waveform == nil {
		proc, err := waveform.NewProcessor(r.pub, waveform.Options{MaxChannels: cfg.Waveform.MaxChannels,
			MaxChunkSamples: cfg.Waveform.MaxChunkSamples}, deps)
		if err != nil {
			if r.own != nil {
				_ = r.own.Close(context.Background())
			}
			return nil, fmt.Errorf("creating replayer: %w", err)
		}
		r.opts.Waveform = proc
	}
	return r, nil
}

// Stats returns the counts so far (safe while Run runs).
func (r *Replayer) Stats() Stats { return r.st.snapshot() }

// Close closes the publisher New created (flushing it within ctx) and idle
// HTTP connections; it is idempotent.
func (r *Replayer) Close(ctx context.Context) error {
	r.closeOnce.Do(func() {
		if r.own != nil {
			r.closeErr = r.own.Close(ctx)
		}
		if r.client != nil {
			r.client.CloseIdleConnections()
		}
	})
	return r.closeErr
}

// item is one sample as read, before validation.
type item struct {
	in    validate.Input
	msgID string
	// field names the sample in dead letters (a PSV column).
	field string
	// raw is the sample's own text (a recording's sample JSON), nil when
	// the unit's raw text stands for it.
	raw []byte
	// refusal is a decode-level refusal.
	refusal *validate.Refusal
}

// unit is one message of the input: a PSV row, a recording line, a
// waveform chunk. It and what it references are valid only during emit.
type unit struct {
	origin      string
	contentType string
	raw         []byte
	msgID       string
	items       []item
	// refusal refuses the whole message.
	refusal *validate.Refusal
	// tenant/patient/device of a whole-message refusal.
	tenant, patient, device string
	// eventMs is the unit's latest event time, for pacing (0 = none).
	eventMs int64
	chunk   *waveform.Chunk
}

// flight is what one lane publishes in one go.
type flight struct {
	batches []*vigilv1.SampleBatch
	letters []*vigilv1.DeadLetter
	// body is an HTTP request body (target mode), carrying samples, to
	// be posted to url (the samples endpoint when empty).
	body    []byte
	url     string
	samples int
	bytes   int
}

// run is the state of one Run.
type run struct {
	*Replayer
	ctx    context.Context
	cancel context.CancelCauseFunc
	sem    *semaphore.Weighted
	lanes  []chan *flight
	// pending flights (in process) and pending HTTP samples, per lane.
	pending  []*flight
	httpReqs []*httpjson.Request
	wg       sync.WaitGroup

	paceStarted bool
	paceWall    time.Time
	paceEvent   int64
	paceHigh    int64
}

// Run replays each input (a file or a folder) in order, and returns when
// everything read is acknowledged, or on the first error (an input that
// cannot be read, Kafka or the target failing past retries) or when ctx
// ends. Refused data is not an error: it is on the dead-letter topic and
// counted in Stats.Refused.
func (r *Replayer) Run(ctx context.Context, inputs []string) (Stats, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	rn := &run{Replayer: r, ctx: ctx, cancel: cancel, sem: semaphore.NewWeighted(r.opts.MaxInFlightBytes)}
	rn.lanes = make([]chan *flight, r.opts.Lanes)
	rn.pending = make([]*flight, r.opts.Lanes)
	rn.httpReqs = make([]*httpjson.Request, r.opts.Lanes)
	for i := range rn.lanes {
		rn.lanes[i] = make(chan *flight, 2)
		rn.wg.Add(1)
		go rn.lane(rn.lanes[i])
	}
	if p := r.opts.Progress; p != nil {
		p.start(r, inputs)
		defer p.finish()
	}
	var err error
	for _, in := range inputs {
		if err = rn.input(in); err != nil {
			if errors.Is(err, errEnough) {
				err = nil
			}
			break
		}
	}
	if err == nil {
		err = rn.flushAll()
	}
	for _, ch := range rn.lanes {
		close(ch)
	}
	rn.wg.Wait()
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
		err = cause
	} else if err == nil {
		err = ctx.Err()
	}
	return r.st.snapshot(), err
}

// fail stops the run with err (the first one wins).
func (rn *run) fail(err error) { rn.cancel(err) }

// lane publishes flights in order until ch closes.
func (rn *run) lane(ch <-chan *flight) {
	defer rn.wg.Done()
	for f := range ch {
		if rn.ctx.Err() == nil {
			if err := rn.send(f); err != nil {
				rn.fail(err)
			}
		}
		rn.sem.Release(int64(f.bytes))
	}
}

// send publishes one flight: dead letters first (as the HTTP path does),
// then the batches; retriable failures are retried with backoff (batch ids
// are deterministic, so consumers de-duplicate what a failed attempt wrote).
func (rn *run) send(f *flight) error {
	if f.body != nil {
		return rn.post(f)
	}
	backoff := 200 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := rn.pub.DeadLetter(rn.ctx, f.letters)
		if err == nil {
			err = rn.pub.Publish(rn.ctx, f.batches)
		}
		if err == nil {
			n := 0
			for _, b := range f.batches {
				n += len(b.Samples)
			}
			rn.st.samples.Add(int64(n))
			rn.st.batches.Add(int64(len(f.batches)))
			return nil
		}
		if !publish.IsRetriable(err) || attempt == 5 || rn.ctx.Err() != nil {
			return fmt.Errorf("replaying into kafka: %w", err)
		}
		rn.log.Warn("replay: publish failed; retrying", "attempt", attempt, "err", err)
		select {
		case <-rn.ctx.Done():
			return rn.ctx.Err()
		case <-time.After(backoff):
		}
		backoff *= 2
	}
}

// laneOf spreads patients over lanes; one patient always uses one lane.
func (rn *run) laneOf(tenant, patient string) int {
	h := fnv.New32a()
	_, _ = io.WriteString(h, tenant)
	_, _ = h.Write([]byte{'/'})
	_, _ = io.WriteString(h, patient)
	return int(h.Sum32() % uint32(len(rn.lanes)))
}

// dispatch hands lane i's pending flight to its publisher, waiting for
// in-flight bytes to allow it.
func (rn *run) dispatch(i int) error {
	f := rn.pending[i]
	if f == nil {
		return nil
	}
	rn.pending[i] = nil
	if err := rn.sem.Acquire(rn.ctx, int64(f.bytes)); err != nil {
		return rn.stopped()
	}
	select {
	case rn.lanes[i] <- f:
		return nil
	case <-rn.ctx.Done():
		rn.sem.Release(int64(f.bytes))
		return rn.stopped()
	}
}

func (rn *run) stopped() error {
	if c := context.Cause(rn.ctx); c != nil {
		return c
	}
	return rn.ctx.Err()
}

func (rn *run) flushAll() error {
	for i := range rn.lanes {
		if rn.httpReqs[i] != nil {
			if err := rn.flushHTTP(i); err != nil {
				return err
			}
		}
		if err := rn.dispatch(i); err != nil {
			return err
		}
	}
	return nil
}

func (rn *run) flightOf(i int) *flight {
	if rn.pending[i] == nil {
		rn.pending[i] = &flight{}
	}
	return rn.pending[i]
}

// pace waits, with --speed, until the wall clock reaches the unit's event
// time scaled by the speed. It paces on the highest event time reached so
// far, so inputs that restart in time (PSV patients all beginning at
// Start) play at full speed until they pass it.
func (rn *run) pace(eventMs int64) error {
	if rn.opts.Speed <= 0 || eventMs == 0 {
		return nil
	}
	if !rn.paceStarted {
		rn.paceStarted, rn.paceWall, rn.paceEvent, rn.paceHigh = true, time.Now(), eventMs, eventMs
		return nil
	}
	if eventMs <= rn.paceHigh {
		return nil
	}
	rn.paceHigh = eventMs
	due := rn.paceWall.Add(time.Duration(float64(eventMs-rn.paceEvent) * float64(time.Millisecond) / rn.opts.Speed))
	wait := time.Until(due)
	if wait <= 0 {
		return nil
	}
	// Send what is pending before sleeping, so that it arrives on time.
	if err := rn.flushAll(); err != nil {
		return err
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-rn.ctx.Done():
		return rn.stopped()
	case <-t.C:
		return nil
	}
}

// emit validates one unit and queues its batches and dead letters.
func (rn *run) emit(u *unit) error {
	if err := rn.ctx.Err(); err != nil {
		return rn.stopped()
	}
	rn.st.rows.Add(1)
	if err := rn.pace(u.eventMs); err != nil {
		return err
	}
	if u.chunk != nil {
		return rn.emitChunk(u)
	}
	if rn.url != "" {
		return rn.emitHTTP(u)
	}
	now := rn.clock.Now().UnixMilli()
	if u.refusal != nil {
		rn.st.refused.Add(1)
		return rn.queueLetter(rn.laneOf(u.tenant, u.patient), rn.wholeLetter(u, now))
	}
	// Group accepted samples into one batch per (tenant, patient, device,
	// message id), in order of first appearance, as the HTTP path does.
	var batches []*vigilv1.SampleBatch
	samples := make([]vigilv1.Sample, len(u.items))
	for i := range u.items {
		it := &u.items[i]
		rf := it.refusal
		if rf == nil {
			rf = rn.val.Sample(&it.in, now, &samples[i])
			if rf != nil && it.field != "" {
				rf.Field = it.field
			}
		}
		if rf != nil {
			rn.st.refused.Add(1)
			if err := rn.queueLetter(rn.laneOf(it.in.Tenant, it.in.Patient), rn.letter(u, it, rf, now)); err != nil {
				return err
			}
			continue
		}
		var b *vigilv1.SampleBatch
		for _, c := range batches {
			if c.Tenant == it.in.Tenant && c.Patient == it.in.Patient && c.Device == it.in.Device && c.MessageId == it.msgID {
				b = c
				break
			}
		}
		if b == nil {
			b = &vigilv1.SampleBatch{SchemaVersion: publish.SchemaVersion, Tenant: it.in.Tenant, Patient: it.in.Patient,
				Device: it.in.Device, Source: vigilv1.Source_SOURCE_REPLAY, MessageId: it.msgID}
			batches = append(batches, b)
		}
		b.Samples = append(b.Samples, &samples[i])
	}
	for _, b := range batches {
		i := rn.laneOf(b.Tenant, b.Patient)
		f := rn.flightOf(i)
		f.batches = append(f.batches, b)
		f.bytes += 48 + len(b.Tenant) + len(b.Patient) + len(b.Device) + len(b.MessageId) + 40*len(b.Samples)
		if f.bytes >= rn.opts.FlightBytes {
			if err := rn.dispatch(i); err != nil {
				return err
			}
		}
	}
	return nil
}

func (rn *run) queueLetter(i int, dl *vigilv1.DeadLetter) error {
	f := rn.flightOf(i)
	f.letters = append(f.letters, dl)
	f.bytes += 128 + len(dl.Raw)
	if f.bytes >= rn.opts.FlightBytes {
		return rn.dispatch(i)
	}
	return nil
}

// letter is the dead letter of refused item it of u. Raw is copied (the
// reader reuses its buffers).
func (rn *run) letter(u *unit, it *item, rf *validate.Refusal, now int64) *vigilv1.DeadLetter {
	raw := it.raw
	if raw == nil {
		raw = u.raw
	}
	raw = append([]byte(nil), raw[:min(len(raw), 64<<10)]...)
	dl := &vigilv1.DeadLetter{SchemaVersion: publish.SchemaVersion, Reason: string(rf.Reason), Message: rf.Message,
		Source: vigilv1.Source_SOURCE_REPLAY, Origin: u.origin, Field: rf.Field, Raw: raw, RefusedTimeMs: now,
		Tenant: it.in.Tenant, Patient: it.in.Patient, Device: it.in.Device, MessageId: it.msgID, ContentType: u.contentType}
	if it.refusal == nil {
		dl.Batch = &vigilv1.SampleBatch{SchemaVersion: publish.SchemaVersion, Tenant: it.in.Tenant, Patient: it.in.Patient,
			Device: it.in.Device, Source: vigilv1.Source_SOURCE_REPLAY, MessageId: it.msgID,
			Samples: []*vigilv1.Sample{{Metric: it.in.Metric, Value: it.in.Value, Unit: it.in.Unit, EventTimeMs: it.in.EventTimeMs,
				Sequence: it.in.Sequence, Channel: it.in.Channel}}}
	}
	return dl
}

// wholeLetter is the dead letter of a message refused as a whole.
func (rn *run) wholeLetter(u *unit, now int64) *vigilv1.DeadLetter {
	raw := append([]byte(nil), u.raw[:min(len(u.raw), 64<<10)]...)
	return &vigilv1.DeadLetter{SchemaVersion: publish.SchemaVersion, Reason: string(u.refusal.Reason), Message: u.refusal.Message,
		Source: vigilv1.Source_SOURCE_REPLAY, Origin: u.origin, Field: u.refusal.Field, Raw: raw, RawSize: uint64(len(u.raw)),
		RefusedTimeMs: now, Tenant: u.tenant, Patient: u.patient, Device: u.device, MessageId: u.msgID, ContentType: u.contentType}
}

// emitChunk hands a waveform chunk to the waveform sink (in process) or
// queues it for the target's POST /v1/waveforms, after what is pending, so
// that the order of the input is kept. In process, a chunk the processor
// refuses for its content becomes a dead letter (its values counted as
// refused); a retriable publishing failure is retried like a flight (the
// processor rolled its detector back, so the retry continues exactly).
func (rn *run) emitChunk(u *unit) error {
	if err := rn.flushAll(); err != nil {
		return err
	}
	c := u.chunk
	if rn.url != "" {
		return rn.queueChunkHTTP(u)
	}
	backoff := 200 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := rn.opts.Waveform.Chunk(rn.ctx, c)
		var ce *waveform.ChunkError
		switch {
		case err == nil:
			rn.st.samples.Add(int64(len(c.Values)))
			return nil
		case errors.As(err, &ce):
			rn.st.refused.Add(int64(len(c.Values)))
			dl := &vigilv1.DeadLetter{SchemaVersion: publish.SchemaVersion, Reason: string(ce.Reason), Message: ce.Message,
				Source: vigilv1.Source_SOURCE_REPLAY, Origin: u.origin, Field: ce.Field, RawSize: uint64(len(c.Values)),
				RefusedTimeMs: rn.clock.Now().UnixMilli(), Tenant: c.Tenant, Patient: c.Patient, Device: c.Device,
				MessageId: c.MessageID, ContentType: contentTypeWFDB}
			if err := rn.queueLetter(rn.laneOf(c.Tenant, c.Patient), dl); err != nil {
				return err
			}
			return rn.dispatch(rn.laneOf(c.Tenant, c.Patient))
		case !publish.IsRetriable(err) || attempt == 5 || rn.ctx.Err() != nil:
			return fmt.Errorf("replaying waveform chunk %s: %w", u.origin, err)
		}
		rn.log.Warn("replay: waveform chunk failed; retrying", "attempt", attempt, "err", err)
		select {
		case <-rn.ctx.Done():
			return rn.stopped()
		case <-time.After(backoff):
		}
		backoff *= 2
	}
}

// queueChunkHTTP queues a chunk as a POST /v1/waveforms body on its
// patient's lane, so that one channel's chunks arrive in order. Invalid
// (NaN) values repeat the last valid one, as the detector does in process:
// JSON has no NaN.
func (rn *run) queueChunkHTTP(u *unit) error {
	c := u.chunk
	last := 0.0
	for i, v := range c.Values {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			c.Values[i] = last
		} else {
			last = v
		}
	}
	body, err := json.Marshal(waveform.Request{Tenant: c.Tenant, Patient: c.Patient, Device: c.Device, Channel: c.Channel,
		Metric: c.Metric, Unit: c.Unit, RateHz: c.RateHz, StartMs: c.StartMs, MessageID: c.MessageID, Values: c.Values})
	if err != nil {
		return fmt.Errorf("encoding waveform chunk %s: %w", u.origin, err)
	}
	if err := rn.sem.Acquire(rn.ctx, int64(len(body))); err != nil {
		return rn.stopped()
	}
	select {
	case rn.lanes[rn.laneOf(c.Tenant, c.Patient)] <- &flight{body: body, url: rn.waveURL, samples: len(c.Values), bytes: len(body)}:
		return nil
	case <-rn.ctx.Done():
		rn.sem.Release(int64(len(body)))
		return rn.stopped()
	}
}
