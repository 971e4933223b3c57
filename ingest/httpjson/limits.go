package httpjson

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/dedupe"
	"github.com/vigilhealth/vigil/ingest/ratelimit"
	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// limits are the per-source rate limit and the duplicate filter of a
// Handler (ingest.rate_limit, ingest.dedupe_window). Either may be nil
// (disabled). Both are safe for concurrent use.
type limits struct {
	rate       *ratelimit.Limiter
	dedupe     *dedupe.Filter
	duplicates *prometheus.CounterVec
}

// newLimits creates the rate limiter and duplicate filter of cfg.Ingest and
// registers their metrics on reg (vigil_ingest_rate_limited_total{source},
// vigil_ingest_duplicates_total{source}, ...). name labels them
// ("http", "mqtt") so that several handlers share one registry.
func newLimits(cfg config.Ingest, deps stage.Deps, name string) (*limits, error) {
	l := &limits{duplicates: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_ingest_duplicates_total",
		Help: "Samples accepted but not published again because their (tenant, device, sequence) was already published within ingest.dedupe_window, by ingest source.",
	}, []string{"source"})}
	// One duplicates counter (labelled by source) serves every handler on
	// the registry.
	if err := deps.Metrics.Register(l.duplicates); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return nil, fmt.Errorf("registering duplicate metrics: %w", err)
		}
		existing, same := are.ExistingCollector.(*prometheus.CounterVec)
		if !same {
			return nil, fmt.Errorf("registering duplicate metrics: %w", err)
		}
		l.duplicates = existing
	}
	if cfg.RateLimit.SamplesPerSecond > 0 {
		l.rate = ratelimit.New(cfg.RateLimit.SamplesPerSecond, cfg.RateLimit.Burst, max(cfg.RateLimit.MaxSources, 1), deps.Clock)
		if err := l.rate.Register(deps.Metrics, name); err != nil {
			return nil, err
		}
	}
	if cfg.DedupeWindow > 0 {
		l.dedupe = dedupe.New(cfg.DedupeWindow, max(cfg.DedupeMaxEntries, 1), deps.Clock)
		if err := l.dedupe.Register(deps.Metrics, name+"_samples"); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// UseLimits gives a Handler made by NewCore (MQTT) the rate limit and
// duplicate filter of cfg (New does this for HTTP), with metrics labelled
// name (e.g. "mqtt"). Over its rate limit, Accept then waits (slows the
// sender down) instead of refusing. Call it before the Handler is used.
func (h *Handler) UseLimits(cfg config.Ingest, deps stage.Deps, name string) error {
	l, err := newLimits(cfg, deps.WithDefaults(), name)
	if err != nil {
		return err
	}
	h.limits, h.rateLimit = l, cfg.RateLimit
	return nil
}

// rateKey is the rate-limit key of a body: its top-level tenant and device,
// else the sender's address (without the port).
func rateKey(b *body, m *Meta) string {
	tenant, device := string(b.tenant.b), string(b.device.b)
	if !b.tenant.ok {
		tenant = m.Tenant
	}
	if !b.device.ok {
		device = m.Device
	}
	if tenant != "" || device != "" {
		return "d\x00" + tenant + "\x00" + device
	}
	host, _, err := net.SplitHostPort(m.Origin)
	if err != nil {
		host = m.Origin
	}
	return "a\x00" + host
}

// limitRate applies the source's rate limit to a decoded body of n samples.
// HTTP is refused at once (429, Retry-After, nothing accepted, not
// dead-lettered: the sender did nothing wrong with the data and is told to
// send it again later); other transports (MQTT) are slowed down until their
// bucket allows them, which backs the sender off. stop reports that o is the
// answer.
func (h *Handler) limitRate(ctx context.Context, b *body, m *Meta, msgID string) (o Outcome, stop bool) {
	if h.limits == nil || h.limits.rate == nil {
		return o, false
	}
	n := len(b.samples)
	key := rateKey(b, m)
	if m.source() != vigilv1.Source_SOURCE_HTTP {
		if err := h.limits.rate.Wait(ctx, key, n); err != nil {
			return h.failed(Outcome{Samples: n, MessageID: msgID}, err), true
		}
		return o, false
	}
	ok, retry := h.limits.rate.Allow(key, n)
	if ok {
		return o, false
	}
	secs := max(int64((retry+time.Second-1)/time.Second), 1)
	return Outcome{Samples: n, MessageID: msgID, RetryAfter: time.Duration(secs) * time.Second, Problem: &Problem{
		Type: problemType("rate-limited"), Title: "Rate limited", Status: 429, MessageID: msgID,
		Reason: string(validate.RateLimited), Rejected: 0,
		Detail: fmt.Sprintf("this sender is over its limit of %s samples/s (burst %d); nothing of these %d samples was accepted: send them again after %d s",
			strconv.FormatFloat(h.rateLimit.SamplesPerSecond, 'f', -1, 64), h.rateLimit.Burst, n, secs),
	}}, true
}

// dropDuplicates removes from batches the samples with a device sequence
// that were already published within the window, or appear twice in these
// batches; they count as accepted (the sender did nothing wrong) and in
// vigil_ingest_duplicates_total. Batches left empty are dropped. The keys
// of the kept samples are left in d.keys for rememberPublished.
func (h *Handler) dropDuplicates(batches []*vigilv1.SampleBatch, source vigilv1.Source, d *decoder) []*vigilv1.SampleBatch {
	d.keys = d.keys[:0]
	if h.limits == nil || h.limits.dedupe == nil {
		return batches
	}
	f := h.limits.dedupe
	var kb []byte
	keys := d.keys
	for _, b := range batches {
		for _, s := range b.Samples {
			if s.Sequence != 0 {
				var r dedupe.Ref
				r, kb = f.SampleRef(kb, b.Tenant, b.Device, s.Sequence)
				keys = append(keys, r)
			}
		}
	}
	// Sequence numbers seen earlier in this request: the bits of each
	// block, with the block of the previous sample kept aside (a device's
	// consecutive samples mostly share a block).
	if d.local == nil {
		d.local = map[dedupe.Key]uint64{}
	}
	clear(d.local)
	var (
		lastKey  dedupe.Key
		lastBits uint64
		haveLast bool
	)
	earlier := func(r dedupe.Ref) bool {
		if !haveLast || r.Key != lastKey {
			if haveLast {
				d.local[lastKey] = lastBits
			}
			lastKey, lastBits, haveLast = r.Key, d.local[r.Key], true
		}
		if lastBits&r.Bits != 0 {
			return true
		}
		lastBits |= r.Bits
		return false
	}
	d.found = f.ContainsRefs(keys, d.found[:0])
	var (
		dups    int
		out     = batches[:0]
		next, w int
	)
	for _, b := range batches {
		kept := b.Samples[:0]
		for _, s := range b.Samples {
			if s.Sequence == 0 {
				kept = append(kept, s)
				continue
			}
			k, found := keys[next], d.found[next]
			next++
			if found || earlier(k) {
				dups++
				continue
			}
			keys[w] = k // w ≤ next: compacting in place
			w++
			kept = append(kept, s)
		}
		b.Samples = kept
		if len(kept) > 0 {
			out = append(out, b)
		}
	}
	d.keys = keys[:w]
	if dups > 0 {
		h.limits.duplicates.WithLabelValues(source.Label()).Add(float64(dups))
	}
	return out
}

// rememberPublished records the sequences of published samples (d.keys,
// from dropDuplicates), once Kafka acknowledged them, so that a sample
// whose publish failed is not suppressed when the sender retries it.
func (h *Handler) rememberPublished(d *decoder) {
	if h.limits == nil || h.limits.dedupe == nil {
		return
	}
	h.limits.dedupe.AddRefs(d.keys)
}
