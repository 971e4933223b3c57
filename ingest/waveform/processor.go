package waveform

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/features/ecg"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Names of what the Processor publishes.
const (
	// RRMetric is the catalogue metric of derived RR intervals.
	RRMetric = "rr_interval"
	// RRUnit is its canonical UCUM unit.
	RRUnit = "ms"
	// RRSourceCode marks the samples as derived from an ECG waveform.
	RRSourceCode = "derived:ecg"
	// MinRRMs and MaxRRMs are the catalogue range of rr_interval: an
	// interval outside it (a pause of more than 3 s, typically a gap in
	// detection) is not published, and counted.
	MinRRMs = 200
	MaxRRMs = 3000
)

// Publisher is what the Processor needs from publish.Publisher: Publish
// blocks until Kafka acknowledged every record.
type Publisher interface {
	Publish(ctx context.Context, batches []*vigilv1.SampleBatch) error
}

// ChunkError is a chunk refused for its content (permanent: the same chunk
// will always be refused). Field names the offending field of the chunk
// ("rate_hz", "values", "unit", ...).
type ChunkError struct {
	Reason  validate.Reason
	Field   string
	Message string
}

// Error returns "field: message".
func (e *ChunkError) Error() string { return e.Field + ": " + e.Message }

// Result is what one chunk produced.
type Result struct {
	// Samples is the number of waveform values taken.
	Samples int
	// RRIntervals is the number of rr_interval samples published.
	RRIntervals int
	// Reset reports that the chunk did not continue its channel's stream
	// (first chunk, gap, overlap or rate change) and the detector
	// restarted.
	Reset bool
	// Secondary reports that the chunk's channel is not its device's RR
	// channel: it was accepted but not analysed (see Processor).
	Secondary bool
}

// TakeoverMs is how long (event time) a device's RR channel may be silent
// before a chunk of another of its channels takes its place.
const TakeoverMs = 10_000

// Options configure a Processor.
type Options struct {
	// MaxChannels bounds the detector states kept (LRU).
	MaxChannels int
	// MaxChunkSamples bounds the values of one chunk.
	MaxChunkSamples int
}

// Processor implements Sink: it runs one streaming R-peak detector per
// (tenant, device, channel) and publishes the RR intervals between
// consecutive R peaks as rr_interval samples (unit ms, QUALITY_DERIVED,
// source code "derived:ecg", event time = the second peak's time, sequence =
// the peak's index on its channel, channel = the waveform's channel).
//
// One RR series per device: every lead of a device sees the same beats, and
// the window engine computes HRV over a patient's rr_interval samples in
// event-time order, so two leads' intervals interleaved would make it
// meaningless. The first channel of a (tenant, device) that sends a chunk
// is its RR channel; chunks of its other channels are accepted and counted
// (vigil_waveform_secondary_samples_total) but not analysed, until the RR
// channel has been silent for TakeoverMs of event time, when the next
// channel that sends takes over (logged).
//
// Chunks of one channel are processed one at a time in arrival order; chunks
// of different channels run concurrently. A chunk whose StartMs does not
// continue the previous chunk of its channel (within one sample period
// plus 1 ms), or whose rate differs, resets that channel's detector (counted
// in vigil_waveform_discontinuities_total). Peaks are confirmed up to about
// 0.45 s after they happen, so the last beat of a chunk is published with
// the next chunk.
//
// Chunk returns only after the chunk's RR samples are acknowledged by Kafka;
// when publishing fails the channel's detector is restored to where it was
// before the chunk, so that the sender's retry of the same chunk continues
// the stream exactly. The number of channel states is bounded by
// MaxChannels; the least recently used is evicted (counted in
// vigil_waveform_evictions_total) and its next chunk starts afresh.
// Safe for concurrent use.
type Processor struct {
	pub  Publisher
	log  *slog.Logger
	opts Options

	mu    sync.Mutex
	lru   *list.List // of *channel, most recent first
	byKey map[chanKey]*list.Element
	// devLRU and byDev hold each device's RR channel (at most
	// MaxChannels devices, least recently used evicted).
	devLRU *list.List // of *device, most recent first
	byDev  map[devKey]*list.Element

	chunks        *prometheus.CounterVec
	samples       prometheus.Counter
	rr            prometheus.Counter
	rrDropped     prometheus.Counter
	discontinuity prometheus.Counter
	evictions     prometheus.Counter
	channels      prometheus.Gauge
	secondary     prometheus.Counter
}

type chanKey struct{ tenant, device, channel string }

type devKey struct{ tenant, device string }

// device is the RR channel of one (tenant, device) and the event time
// (ms) at which its last chunk ended.
type device struct {
	key     devKey
	channel string
	endMs   int64
}

// channel is the detector state of one (tenant, device, channel).
type channel struct {
	key chanKey
	mu  sync.Mutex // held while a chunk of this channel is processed

	det    *ecg.Detector
	snap   *ecg.Detector // state before the chunk in progress
	origin float64       // event time (ms) of detector sample 0
	// Peaks: the index (detector samples) of the last peak, whether there
	// is one, and how many peaks this channel has had (across resets).
	lastPeak int64
	havePeak bool
	peakSeq  uint64
	peaks    []ecg.Peak
}

// NewProcessor creates a Processor publishing through pub and registers its
// metrics on deps.Metrics.
func NewProcessor(pub Publisher, opts Options, deps stage.Deps) (*Processor, error) {
	if pub == nil {
		return nil, errors.New("creating waveform processor: no publisher")
	}
	if opts.MaxChannels < 1 {
		return nil, fmt.Errorf("creating waveform processor: max channels %d, want >= 1", opts.MaxChannels)
	}
	if opts.MaxChunkSamples < 1 {
		return nil, fmt.Errorf("creating waveform processor: max chunk samples %d, want >= 1", opts.MaxChunkSamples)
	}
	deps = deps.WithDefaults()
	p := &Processor{
		pub: pub, log: deps.Log, opts: opts, lru: list.New(), byKey: map[chanKey]*list.Element{},
		devLRU: list.New(), byDev: map[devKey]*list.Element{},
		chunks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_waveform_chunks_total",
			Help: "Waveform chunks processed, by result (ok, secondary, refused, failed).",
		}, []string{"result"}),
		samples: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_waveform_samples_total", Help: "Waveform values taken by the R-peak detectors.",
		}),
		rr: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_waveform_rr_intervals_total", Help: "RR intervals published as rr_interval samples.",
		}),
		rrDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_waveform_rr_out_of_range_total",
			Help: "RR intervals not published because they fall outside 200-3000 ms.",
		}),
		discontinuity: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_waveform_discontinuities_total",
			Help: "Chunks that did not continue their channel's stream (gap, overlap, rate change) and reset its detector.",
		}),
		evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_waveform_evictions_total",
			Help: "Channel detector states evicted (least recently used) to stay within waveform.max_channels.",
		}),
		channels: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vigil_waveform_channels", Help: "Channel detector states held.",
		}),
		secondary: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_waveform_secondary_samples_total",
			Help: "Waveform values of a device's other channels (not its RR channel): accepted, not analysed.",
		}),
	}
	if err := stage.Register(deps.Metrics, "waveform metrics", p.chunks, p.samples, p.rr, p.rrDropped,
		p.discontinuity, p.evictions, p.channels, p.secondary); err != nil {
		return nil, err
	}
	return p, nil
}

// Chunk implements Sink for the ingest paths (the MLLP handler's NA OBX
// chunks, the replayer's WFDB chunks). It blocks until the chunk's
// rr_interval samples are acknowledged by Kafka, or ctx ends. A
// *ChunkError (errors.As) refuses the chunk's content for good: its Reason
// and Field are what an HL7 AE/AR answer or a dead letter should carry.
// Any other error is a publishing failure, after which the channel is as it
// was before the call (publish.IsRetriable says whether a retry of the same
// chunk may succeed). The processor owns c.Values after the call.
func (p *Processor) Chunk(ctx context.Context, c *Chunk) error {
	_, err := p.Process(ctx, c)
	return err
}

// ECGUnitScale returns the factor that converts values in unit to mV, and
// whether unit is one the processor takes (mV, uV, µV, [uV], V; "" is mV).
func ECGUnitScale(unit string) (float64, bool) {
	switch unit {
	case "mV", "":
		return 1, true
	case "uV", "[uV]", "µV":
		return 0.001, true
	case "V":
		return 1000, true
	}
	return 0, false
}

// check refuses a chunk the detector cannot take.
func (p *Processor) check(c *Chunk) (float64, *ChunkError) {
	bad := func(reason validate.Reason, field, format string, args ...any) (float64, *ChunkError) {
		return 0, &ChunkError{Reason: reason, Field: field, Message: fmt.Sprintf(format, args...)}
	}
	if rf := validate.CheckIDs(c.Tenant, c.Patient, c.Device); rf != nil {
		return bad(rf.Reason, rf.Field, "%s", rf.Message)
	}
	if rf := validate.CheckID(validate.FieldChannel, c.Channel, 64); rf != nil {
		return bad(rf.Reason, rf.Field, "%s", rf.Message)
	}
	if c.Metric != "ecg" {
		return bad(validate.UnknownMetric, "metric", "%q: only \"ecg\" waveforms are processed", c.Metric)
	}
	scale, ok := ECGUnitScale(c.Unit)
	if !ok {
		return bad(validate.UnitNotConvertible, "unit", "%q: send mV (or uV, V)", c.Unit)
	}
	if !(c.RateHz >= ecg.MinRateHz && c.RateHz <= ecg.MaxRateHz) {
		return bad(validate.OutOfRange, "rate_hz", "%v Hz: the detector takes %d to %d Hz", c.RateHz, ecg.MinRateHz, ecg.MaxRateHz)
	}
	if len(c.Values) == 0 {
		return bad(validate.MissingField, "values", "no values")
	}
	if len(c.Values) > p.opts.MaxChunkSamples {
		return bad(validate.TooManySamples, "values", "%d values, at most %d per chunk: split it", len(c.Values), p.opts.MaxChunkSamples)
	}
	return scale, nil
}

// Process is Chunk returning what the chunk produced. A *ChunkError means
// the chunk was refused and nothing happened; other errors come from
// publishing (classify them with publish.IsRetriable) and leave the
// channel as it was before the call.
func (p *Processor) Process(ctx context.Context, c *Chunk) (Result, error) {
	scale, cerr := p.check(c)
	if cerr != nil {
		p.chunks.WithLabelValues("refused").Inc()
		return Result{}, cerr
	}
	endMs := c.StartMs + int64(math.Round(float64(len(c.Values))*1000/c.RateHz))
	if !p.rrChannel(c, endMs) {
		p.chunks.WithLabelValues("secondary").Inc()
		p.secondary.Add(float64(len(c.Values)))
		return Result{Samples: len(c.Values), Secondary: true}, nil
	}
	ch := p.channel(chanKey{c.Tenant, c.Device, c.Channel}, c.RateHz)
	ch.mu.Lock()
	defer ch.mu.Unlock()

	var res Result
	// Continuity: the chunk must start where the previous one ended.
	period := 1000 / c.RateHz
	had := ch.det.Samples() > 0
	expected := ch.origin + float64(ch.det.Samples())*period
	switch {
	case ch.det.RateHz() != c.RateHz:
		d, _ := ecg.New(c.RateHz) // rate checked above
		ch.det, ch.snap = d, nil
		res.Reset = true
	case !had || math.Abs(float64(c.StartMs)-expected) > period+1:
		ch.det.Reset()
		res.Reset = true
	}
	if res.Reset {
		if had {
			p.discontinuity.Inc()
			p.log.Debug("waveform discontinuity: detector reset", "tenant", c.Tenant, "device", c.Device,
				"channel", c.Channel, "start_ms", c.StartMs, "expected_ms", int64(math.Round(expected)), "rate_hz", c.RateHz)
		}
		ch.origin = float64(c.StartMs)
		ch.havePeak = false
	}
	if ch.snap == nil {
		ch.snap, _ = ecg.New(c.RateHz)
	}
	ch.snap.CopyFrom(ch.det)
	savedOrigin, savedLast, savedHave, savedSeq := ch.origin, ch.lastPeak, ch.havePeak, ch.peakSeq

	values := c.Values
	if scale != 1 {
		for i := range values {
			values[i] *= scale // the receiver owns Values
		}
	}
	ch.peaks = ch.det.Process(ch.peaks[:0], values)

	batch := &vigilv1.SampleBatch{
		SchemaVersion: publish.SchemaVersion, Tenant: c.Tenant, Patient: c.Patient, Device: c.Device,
		Source: c.Source, MessageId: c.MessageID, Location: c.Location,
	}
	if len(ch.peaks) > 0 {
		batch.Samples = make([]*vigilv1.Sample, 0, len(ch.peaks))
		slab := make([]vigilv1.Sample, len(ch.peaks))
		for k, pk := range ch.peaks {
			seq := ch.peakSeq
			ch.peakSeq++
			prev, had := ch.lastPeak, ch.havePeak
			ch.lastPeak, ch.havePeak = pk.Index, true
			if !had {
				continue
			}
			rr := float64(pk.Index-prev) * 1000 / c.RateHz
			if rr < MinRRMs || rr > MaxRRMs {
				p.rrDropped.Inc()
				continue
			}
			s := &slab[k]
			s.Metric, s.Unit, s.Value = RRMetric, RRUnit, rr
			s.EventTimeMs = int64(math.Round(ch.origin + float64(pk.Index)*period))
			s.Sequence = seq
			s.Quality = uint32(vigilv1.QualityFlag_QUALITY_DERIVED)
			s.SourceCode = RRSourceCode
			s.Channel = c.Channel
			batch.Samples = append(batch.Samples, s)
		}
	}
	if len(batch.Samples) > 0 {
		if err := p.pub.Publish(ctx, []*vigilv1.SampleBatch{batch}); err != nil {
			// Undo the chunk so that a retry continues exactly.
			ch.det.CopyFrom(ch.snap)
			ch.origin, ch.lastPeak, ch.havePeak, ch.peakSeq = savedOrigin, savedLast, savedHave, savedSeq
			p.chunks.WithLabelValues("failed").Inc()
			return Result{}, fmt.Errorf("publishing %d rr_interval samples: %w", len(batch.Samples), err)
		}
	}
	res.Samples = len(values)
	res.RRIntervals = len(batch.Samples)
	p.chunks.WithLabelValues("ok").Inc()
	p.samples.Add(float64(res.Samples))
	p.rr.Add(float64(res.RRIntervals))
	return res, nil
}

// rrChannel reports whether c's channel is its device's RR channel (taking
// the place when the device has none, or its RR channel was silent for
// TakeoverMs), and records endMs as the device's latest chunk end.
func (p *Processor) rrChannel(c *Chunk, endMs int64) bool {
	k := devKey{c.Tenant, c.Device}
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := p.byDev[k]
	if !ok {
		e = p.devLRU.PushFront(&device{key: k, channel: c.Channel, endMs: endMs})
		p.byDev[k] = e
		for p.devLRU.Len() > p.opts.MaxChannels {
			old := p.devLRU.Back()
			p.devLRU.Remove(old)
			delete(p.byDev, old.Value.(*device).key)
		}
		return true
	}
	p.devLRU.MoveToFront(e)
	d := e.Value.(*device)
	if d.channel != c.Channel {
		if c.StartMs-d.endMs <= TakeoverMs {
			return false
		}
		p.log.Info("waveform RR channel taken over", "tenant", c.Tenant, "device", c.Device, "from", d.channel,
			"to", c.Channel, "silent_ms", c.StartMs-d.endMs)
		d.channel = c.Channel
	}
	d.endMs = max(d.endMs, endMs)
	return true
}

// channel returns the state of k, creating it (and evicting the least
// recently used beyond MaxChannels) when absent.
func (p *Processor) channel(k chanKey, rate float64) *channel {
	p.mu.Lock()
	defer p.mu.Unlock()
	if e, ok := p.byKey[k]; ok {
		p.lru.MoveToFront(e)
		return e.Value.(*channel)
	}
	d, _ := ecg.New(rate)
	ch := &channel{key: k, det: d}
	p.byKey[k] = p.lru.PushFront(ch)
	for p.lru.Len() > p.opts.MaxChannels {
		old := p.lru.Back()
		p.lru.Remove(old)
		oc := old.Value.(*channel)
		delete(p.byKey, oc.key)
		p.evictions.Inc()
		p.log.Debug("waveform channel evicted", "tenant", oc.key.tenant, "device", oc.key.device, "channel", oc.key.channel)
	}
	p.channels.Set(float64(p.lru.Len()))
	return ch
}
