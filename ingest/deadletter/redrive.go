package deadletter

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Resolver gives a device or bed its patient at an event time
// (binding.Store).
type Resolver interface {
	Resolve(tenant, deviceOrBed string, atMs int64) (patient string, ok bool)
}

// Publisher writes samples and dead letters, blocking until Kafka
// acknowledged them (publish.Publisher).
type Publisher interface {
	Publish(ctx context.Context, batches []*vigilv1.SampleBatch) error
	DeadLetter(ctx context.Context, letters []*vigilv1.DeadLetter) error
}

// AuditWriter writes audit events (see NewAuditWriter).
type AuditWriter interface {
	Audit(ctx context.Context, events []*vigilv1.AuditEvent) error
}

// Redriver re-drives dead letters that carry a decoded batch: it gives
// samples without a patient their patient through Resolver (at each
// sample's event time), validates them again as of their original ingest
// time (so a re-driven sample is the one that would have been accepted
// then), publishes the accepted ones with their original message id, source
// and ingest time (sinks store a sample once however often it is written:
// ClickHouse's samples table is a ReplacingMergeTree on the sample's
// identity), writes a fresh dead letter for each sample refused again, and
// records each attempt as an audit event. Letters without a batch cannot be
// re-driven (raw only: the sender must resend).
//
// A Redriver is used by one goroutine at a time.
type Redriver struct {
	// Resolver may be nil: then samples without a patient are refused
	// again as unbound_device.
	Resolver  Resolver
	Validator *validate.Validator
	Publisher Publisher
	Audit     AuditWriter
	Clock     clock.Clock
	// Actor names who re-drives (the OS user), recorded on audit events.
	Actor string
	// Again re-drives letters that were re-driven before (by default they
	// are skipped).
	Again bool
	// DryRun reports what would happen and writes nothing.
	DryRun bool
}

// Outcome of one letter's re-drive.
const (
	OutcomeRedriven      = "redriven"
	OutcomeRefusedAgain  = "refused_again"
	OutcomePartial       = "partial"
	OutcomeNotRedrivable = "not_redrivable"
	OutcomeSkipped       = "already_redriven"
)

// Result is what became of one letter.
type Result struct {
	ID      string `json:"id"`
	Outcome string `json:"outcome"`
	// Samples re-driven and refused again.
	Samples int    `json:"samples"`
	Refused int    `json:"refused"`
	Detail  string `json:"detail"`
}

// Summary counts the letters of a re-drive by outcome.
type Summary struct {
	Letters       int      `json:"letters"`
	Redriven      int      `json:"redriven"`
	Samples       int      `json:"samples"`
	RefusedAgain  int      `json:"refused_again"`
	NotRedrivable int      `json:"not_redrivable"`
	Skipped       int      `json:"already_redriven"`
	DryRun        bool     `json:"dry_run"`
	Results       []Result `json:"results"`
}

// chunk bounds the letters whose records are published together.
const chunk = 256

// Redrive re-drives letters (see Redriver) in chunks, each chunk's samples,
// then fresh dead letters, then audit events, every write acknowledged by
// Kafka before the next. A failure stops it; what was written stays (and
// its audit events are written only after its samples, so a repeated
// re-drive after a crash writes the same samples again, which the sinks
// store once).
func (r *Redriver) Redrive(ctx context.Context, letters []Letter) (Summary, error) {
	if r.Validator == nil || (!r.DryRun && (r.Publisher == nil || r.Audit == nil)) {
		return Summary{}, errors.New("re-driving: validator, publisher and audit writer are required")
	}
	if r.Clock == nil {
		r.Clock = clock.System{}
	}
	sum := Summary{DryRun: r.DryRun, Results: []Result{}}
	for start := 0; start < len(letters); start += chunk {
		var (
			batches []*vigilv1.SampleBatch
			fresh   []*vigilv1.DeadLetter
			audits  []*vigilv1.AuditEvent
			now     = r.Clock.Now().UnixMilli()
		)
		for _, l := range letters[start:min(start+chunk, len(letters))] {
			res, bs, dls := r.one(l, now)
			sum.Letters++
			switch res.Outcome {
			case OutcomeNotRedrivable:
				sum.NotRedrivable++
			case OutcomeSkipped:
				sum.Skipped++
			case OutcomeRedriven:
				sum.Redriven++
			case OutcomeRefusedAgain:
				sum.RefusedAgain++
			case OutcomePartial:
				sum.Redriven++
				sum.RefusedAgain++
			}
			sum.Samples += res.Samples
			sum.Results = append(sum.Results, res)
			batches, fresh = append(batches, bs...), append(fresh, dls...)
			if res.Outcome != OutcomeNotRedrivable && res.Outcome != OutcomeSkipped {
				audits = append(audits, &vigilv1.AuditEvent{SchemaVersion: 1,
					Id:     fmt.Sprintf("%s/%s/%d", AuditAction, res.ID, now),
					Tenant: l.DL.Tenant, Actor: r.Actor, Action: AuditAction, Resource: Resource(res.ID),
					TimeMs: now, Outcome: res.Outcome, Detail: res.Detail})
			}
		}
		if r.DryRun {
			continue
		}
		if err := r.Publisher.Publish(ctx, batches); err != nil {
			return sum, fmt.Errorf("publishing re-driven samples: %w", err)
		}
		if err := r.Publisher.DeadLetter(ctx, fresh); err != nil {
			return sum, fmt.Errorf("publishing fresh dead letters: %w", err)
		}
		if err := r.Audit.Audit(ctx, audits); err != nil {
			return sum, fmt.Errorf("recording re-drives: %w", err)
		}
	}
	return sum, nil
}

// one works out the re-drive of l: the batches to publish and the fresh
// dead letters.
func (r *Redriver) one(l Letter, now int64) (Result, []*vigilv1.SampleBatch, []*vigilv1.DeadLetter) {
	res := Result{ID: l.ID()}
	d := l.DL
	if d.Batch == nil || len(d.Batch.Samples) == 0 {
		res.Outcome, res.Detail = OutcomeNotRedrivable, "raw only: fix the sender and resend"
		return res, nil, nil
	}
	if len(l.Redrives) > 0 && !r.Again {
		last := l.Redrives[len(l.Redrives)-1]
		res.Outcome = OutcomeSkipped
		res.Detail = fmt.Sprintf("re-driven at %s (%s); --again re-drives it once more", fmtMs(last.TimeMs), last.Outcome)
		return res, nil, nil
	}
	b := d.Batch
	validAt := b.IngestTimeMs
	if validAt == 0 {
		validAt = d.RefusedTimeMs
	}
	var (
		batches []*vigilv1.SampleBatch
		fresh   []*vigilv1.DeadLetter
		reasons []string
		byPat   = map[string]*vigilv1.SampleBatch{}
	)
	for _, s := range b.Samples {
		patient := b.Patient
		var rf *validate.Refusal
		if patient == "" {
			if r.Resolver != nil {
				patient, _ = r.Resolver.Resolve(b.Tenant, b.Device, s.EventTimeMs)
			}
			if patient == "" {
				rf = validate.Refuse(validate.UnboundDevice, validate.FieldDevice,
					"no patient is bound to device %q of tenant %q at %s", b.Device, b.Tenant, fmtMs(s.EventTimeMs))
			}
		}
		out := &vigilv1.Sample{}
		if rf == nil {
			in := input(b, patient, s)
			rf = r.Validator.Sample(&in, validAt, out)
		}
		if rf != nil {
			res.Refused++
			reasons = append(reasons, string(rf.Reason))
			sb := proto.CloneOf(b)
			sb.Patient = patient
			sb.Samples = []*vigilv1.Sample{proto.CloneOf(s)}
			fresh = append(fresh, &vigilv1.DeadLetter{SchemaVersion: publish.SchemaVersion, Reason: string(rf.Reason),
				Message: rf.Message + " (re-driven from dead letter " + l.ID() + ")", Source: d.Source, Origin: d.Origin,
				Field: rf.Field, Raw: d.Raw, RawSize: d.RawSize, RawTruncated: d.RawTruncated, RefusedTimeMs: now,
				Tenant: b.Tenant, Patient: patient, Device: b.Device, MessageId: b.MessageId, Batch: sb,
				ContentType: d.ContentType})
			continue
		}
		nb := byPat[patient]
		if nb == nil {
			nb = &vigilv1.SampleBatch{SchemaVersion: publish.SchemaVersion, Tenant: b.Tenant, Patient: patient,
				Device: b.Device, Source: b.Source, IngestTimeMs: b.IngestTimeMs, MessageId: b.MessageId, Location: b.Location}
			byPat[patient] = nb
			batches = append(batches, nb)
		}
		nb.Samples = append(nb.Samples, out)
		res.Samples++
	}
	var pats []string
	for _, nb := range batches {
		pats = append(pats, nb.Patient)
	}
	switch {
	case res.Refused == 0:
		res.Outcome = OutcomeRedriven
		res.Detail = fmt.Sprintf("%d samples re-driven to patient %s", res.Samples, strings.Join(pats, ", "))
	case res.Samples == 0:
		res.Outcome = OutcomeRefusedAgain
		res.Detail = "refused again: " + strings.Join(reasons, ", ")
	default:
		res.Outcome = OutcomePartial
		res.Detail = fmt.Sprintf("%d samples re-driven to patient %s, %d refused again: %s",
			res.Samples, strings.Join(pats, ", "), res.Refused, strings.Join(reasons, ", "))
	}
	return res, batches, fresh
}

// input rebuilds the validation input of a sample kept on a dead letter
// (as sent: metric id and/or LOINC code in source_code, unit as sent).
func input(b *vigilv1.SampleBatch, patient string, s *vigilv1.Sample) validate.Input {
	in := validate.Input{Tenant: b.Tenant, Patient: patient, Device: b.Device, Metric: s.Metric, Value: s.Value,
		HasValue: true, Unit: s.Unit, EventTimeMs: s.EventTimeMs, HasTime: true, Sequence: s.Sequence,
		Channel: s.Channel, Quality: s.Quality &^ uint32(vigilv1.QualityFlag_QUALITY_CONVERTED|vigilv1.QualityFlag_QUALITY_BACKFILL),
		SourceCode: s.SourceCode}
	if code, ok := strings.CutPrefix(s.SourceCode, "LOINC:"); ok {
		in.LOINC = code
	}
	return in
}

// KafkaAudit writes audit events to the audit topic, keyed by tenant. It is
// safe for concurrent use; Close it when done.
type KafkaAudit struct {
	cl      *kgo.Client
	topic   string
	timeout time.Duration
}

// NewAuditWriter returns a KafkaAudit for cfg's brokers and audit topic.
func NewAuditWriter(cfg config.Kafka) (*KafkaAudit, error) {
	if len(cfg.Brokers) == 0 {
		return nil, errors.New("no kafka brokers configured: set --brokers (or kafka.brokers)")
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(cfg.Brokers...), kgo.ClientID(cfg.ClientID),
		kgo.RequiredAcks(kgo.AllISRAcks()), kgo.RecordPartitioner(kgo.StickyKeyPartitioner(nil)))
	if err != nil {
		return nil, fmt.Errorf("creating audit producer: %w", err)
	}
	return &KafkaAudit{cl: cl, topic: cfg.Topics.Audit, timeout: cfg.ProduceTimeout}, nil
}

// Audit writes events and blocks until Kafka acknowledged them (or the
// produce timeout passed).
func (a *KafkaAudit) Audit(ctx context.Context, events []*vigilv1.AuditEvent) error {
	if len(events) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	recs := make([]*kgo.Record, 0, len(events))
	for _, ev := range events {
		v, err := proto.Marshal(ev)
		if err != nil {
			return fmt.Errorf("encoding audit event: %w", err)
		}
		recs = append(recs, &kgo.Record{Topic: a.topic, Key: []byte(ev.Tenant), Value: v})
	}
	if err := a.cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		return fmt.Errorf("writing %d audit events to %s: %w", len(recs), a.topic, err)
	}
	return nil
}

// Close closes the producer; idempotent.
func (a *KafkaAudit) Close() { a.cl.Close() }
