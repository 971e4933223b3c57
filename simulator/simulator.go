// Package simulator plays a ward of ICU beds and home wearables into Vigil's
// real ingest endpoint (HTTP POST /v1/samples), for demos (`vigil run
// --simulate`, `vigil simulate`) and end-to-end tests.
//
// It has two halves:
//
//   - the physiology model (Ward, pure and deterministic for a seed): per
//     patient baselines, correlated mean-reverting noise, circadian drift,
//     missing-data gaps and motion artefacts, bedside monitors (1 Hz heart
//     rate, SpO2 and respiratory rate; non-invasive blood pressure every
//     5 minutes; temperature every 4 minutes; consciousness every
//     15 minutes and on change; FiO2 and oxygen flow every minute for
//     patients on oxygen) and wearables (heart rate every 5 s, SpO2 and
//     steps every minute); Deteriorating patients develop sepsis (heart and
//     respiratory rate and temperature rising, blood pressure and SpO2
//     falling, then oxygen, then new confusion) from a NEWS2 of at least 5
//     at the start;
//   - the sender (Simulator): on start it sends PreRoll of simulated
//     history at once (from the start of that minute), like a gateway
//     flushing its buffer, so that one-minute event-time windows close
//     early; then every second it
//     posts what the model produced since, one request carrying every
//     device's samples (with per-device sequence numbers and message ids),
//     retrying with exponential backoff on 5xx and connection errors.
//
// With simulator.gateways set, devices reach Vigil the way a hospital's
// integration engines send them: beds as IHE PCD-01 ORU^R01 over MLLP (after
// an ADT^A01 admission, and one ADT^A02 transfer), wearables as QoS 1 MQTT
// publishes, nurses' temperature spot checks as FHIR R4 Observations in a
// batch Bundle; simulator.gateways.fault_rate adds malformed messages and
// messages with unmapped codes beside the good ones.
package simulator

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
)

// MaxRequestSamples bounds the samples of one request (the pre-roll and any
// catch-up are split), below ingest.max_batch_samples' default.
const MaxRequestSamples = 5000

// tick is the wall-clock interval between requests.
const tick = time.Second

// Simulator sends the Ward's readings to the ingest endpoint. Run it once;
// Close is idempotent. Run and Close may be called from different
// goroutines.
type Simulator struct {
	cfg       config.Simulator
	log       *slog.Logger
	clock     clock.Clock
	url       string
	transport *http.Transport
	client    *http.Client

	sent, accepted, refused, dropped, retries prometheus.Counter
	requests                                  *prometheus.CounterVec
	// gw sends what the configured gateways carry (MLLP, MQTT, FHIR);
	// used by Run's goroutine only.
	gw *gateways
	// rec receives every request body sent (see RecordTo); used by Run's
	// goroutine only.
	rec *recorder
	// mark is the resume mark (see ResumeFrom); nil without one. Used by
	// Run's goroutine only.
	mark *resumeMark

	closeOnce sync.Once
}

// New validates cfg and registers the simulator's metrics on deps.Metrics.
// It contacts nothing.
func New(cfg config.Simulator, deps stage.Deps) (*Simulator, error) {
	deps = deps.WithDefaults()
	switch {
	case cfg.Beds < 0 || cfg.Wearables < 0 || cfg.Deteriorating < 0:
		return nil, errors.New("creating simulator: simulator.beds, wearables and deteriorating must not be negative")
	case cfg.Deteriorating > cfg.Beds+cfg.Wearables:
		return nil, fmt.Errorf("creating simulator: simulator.deteriorating %d is more than beds + wearables", cfg.Deteriorating)
	case cfg.Speed <= 0:
		return nil, errors.New("creating simulator: simulator.speed must be positive")
	case cfg.Tenant == "" || strings.ContainsAny(cfg.Tenant, "/ "):
		return nil, fmt.Errorf("creating simulator: simulator.tenant %q must be set, without '/' or spaces", cfg.Tenant)
	case !strings.HasPrefix(cfg.Target, "http://") && !strings.HasPrefix(cfg.Target, "https://"):
		return nil, fmt.Errorf("creating simulator: simulator.target %q is not an http(s) URL", cfg.Target)
	case cfg.PreRoll < 0 || cfg.Duration < 0:
		return nil, errors.New("creating simulator: simulator.pre_roll and duration must not be negative")
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 10 * time.Second
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = 5 * time.Second
	}
	if cfg.MaxLag < time.Second {
		cfg.MaxLag = 10 * time.Minute
	}
	tr := &http.Transport{MaxIdleConnsPerHost: 2, IdleConnTimeout: 90 * time.Second}
	s := &Simulator{
		cfg:       cfg,
		log:       deps.Log,
		clock:     deps.Clock,
		url:       strings.TrimRight(cfg.Target, "/") + httpjson.Path,
		transport: tr,
		client:    &http.Client{Transport: tr, Timeout: cfg.RequestTimeout},
	}
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	s.sent = counter("vigil_simulator_samples_sent_total", "Simulated samples posted to the ingest endpoint and answered.")
	s.accepted = counter("vigil_simulator_samples_accepted_total", "Simulated samples the ingest endpoint accepted.")
	s.refused = counter("vigil_simulator_samples_refused_total", "Simulated samples the ingest endpoint refused (4xx).")
	s.dropped = counter("vigil_simulator_samples_dropped_total", "Simulated samples dropped unsent: older than simulator.max_lag after an outage, or pending at shutdown.")
	s.retries = counter("vigil_simulator_request_retries_total", "Requests retried after a 5xx answer or a connection error.")
	s.requests = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_simulator_requests_total",
		Help: "Requests to the ingest endpoint by answer (HTTP status code, or \"error\" when there was none)."}, []string{"code"})
	s.gw = newGateways(cfg, deps.Log, s.client, "")
	if err := stage.Register(deps.Metrics, "simulator metrics", s.sent, s.accepted, s.refused, s.dropped, s.retries, s.requests,
		s.gw.messages, s.gw.faults); err != nil {
		return nil, err
	}
	return s, nil
}

// Run plays the ward until ctx ends or simulator.duration (wall time)
// passes, and returns nil then. It first sends the pre-roll, then posts the
// new samples once a second. A request in flight when ctx ends is abandoned.
func (s *Simulator) Run(ctx context.Context) error {
	if s.cfg.Duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.cfg.Duration)
		defer cancel()
	}
	wallStart := s.clock.Now()
	// The pre-roll starts on a minute boundary, so that its first
	// one-minute window is complete.
	simStart := wallStart.Add(-s.cfg.PreRoll).Truncate(time.Minute)
	if s.cfg.PreRoll == 0 {
		simStart = wallStart.Truncate(time.Second)
	}
	simStart = s.resumeStart(simStart)
	ward := NewWard(WardConfig{
		Beds: s.cfg.Beds, Wearables: s.cfg.Wearables, Deteriorating: s.cfg.Deteriorating, Seed: s.cfg.Seed,
		Start: simStart,
		// Sequence numbers grow across restarts: a later run starts
		// above everything an earlier one sent.
		SeqBase: uint64(wallStart.Unix()) << 32,
	})
	sn := &sendState{runID: strconv.FormatInt(wallStart.Unix(), 36)}
	s.gw.runID = sn.runID
	defer s.gw.close()
	s.log.Info("simulator started", "target", s.url, "beds", s.cfg.Beds, "wearables", s.cfg.Wearables,
		"deteriorating", s.cfg.Deteriorating, "speed", s.cfg.Speed, "seed", s.cfg.Seed, "pre_roll", s.cfg.PreRoll)
	if s.cfg.PreRoll > 0 {
		s.catchUp(ctx, ward, sn, wallStart)
		s.log.Info("simulator pre-roll sent", "from", simStart.Format(time.RFC3339), "samples", sn.samples)
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			s.log.Info("simulator stopped", "samples", sn.samples, "requests", sn.requests)
			return nil
		case <-t.C:
		}
		// Simulated time never runs ahead of the wall clock: ingest rightly
		// refuses measurements from the future.
		now := s.clock.Now()
		target := wallStart.Add(time.Duration(float64(now.Sub(wallStart)) * s.cfg.Speed))
		if target.After(now) {
			target = now
		}
		s.catchUp(ctx, ward, sn, target)
	}
}

// sendState is the sender's bookkeeping of one run.
type sendState struct {
	runID    string
	requests int
	samples  int
	buf      []Reading
	outage   bool
}

// catchUp steps the ward up to simulated time target and sends what it
// produced, in requests of at most MaxRequestSamples. Simulated time more
// than MaxLag behind target is stepped over and its readings dropped.
func (s *Simulator) catchUp(ctx context.Context, w *Ward, sn *sendState, target time.Time) {
	if behind := target.Sub(w.Now()); behind > s.cfg.MaxLag {
		n := 0
		for target.Sub(w.Now()) > s.cfg.MaxLag {
			n += len(w.Step(sn.buf[:0]))
		}
		s.dropped.Add(float64(n))
		s.log.Warn("simulator fell behind; skipping simulated data", "behind", behind.Round(time.Second), "dropped_samples", n)
	}
	sn.buf = sn.buf[:0]
	for !w.Now().After(target) && ctx.Err() == nil {
		sn.buf = w.Step(sn.buf)
		if len(sn.buf) >= MaxRequestSamples {
			s.sendChunks(ctx, sn)
		}
	}
	if len(sn.buf) > 0 && ctx.Err() == nil {
		s.sendChunks(ctx, sn)
	}
	sn.buf = sn.buf[:0]
}

// sendChunks hands what the configured gateways carry (beds over MLLP,
// wearables over MQTT, spot checks over FHIR) to them, sends the rest of
// sn.buf in requests of at most MaxRequestSamples (one simulated second of a
// large ward can hold more) and empties it.
func (s *Simulator) sendChunks(ctx context.Context, sn *sendState) {
	all := sn.buf
	s.markSending(all)
	rest := s.gw.route(ctx, all)
	sn.samples += len(all) - len(rest)
	for len(rest) > 0 && ctx.Err() == nil {
		n := min(len(rest), MaxRequestSamples)
		sn.buf = rest[:n]
		s.send(ctx, sn)
		rest = rest[n:]
	}
	sn.buf = all[:0]
}

// send posts sn.buf as one request, retrying 5xx answers and connection
// errors with exponential backoff (honouring Retry-After, capped at
// RetryMax) until an answer or ctx ends. A 4xx answer is final: a 400 with
// partial acceptance is never resent (its valid samples are in).
func (s *Simulator) send(ctx context.Context, sn *sendState) {
	sn.requests++
	body, err := s.encode(sn)
	if err != nil {
		s.log.Error("simulator: encoding request", "err", err)
		s.dropped.Add(float64(len(sn.buf)))
		return
	}
	s.record(body)
	n := len(sn.buf)
	backoff := 100 * time.Millisecond
	for {
		a, err := s.post(ctx, body)
		switch {
		case err == nil && a.code == http.StatusOK:
			s.answered(sn, n, n, 0)
			return
		case err == nil && a.code >= 400 && a.code < 500 && a.code != http.StatusRequestTimeout && a.code != http.StatusTooManyRequests:
			var p httpjson.Problem
			if a.code == http.StatusBadRequest && json.Unmarshal(a.body, &p) == nil && p.Accepted+p.Rejected == n {
				s.answered(sn, n, p.Accepted, p.Rejected)
				s.log.Warn("simulator: ingest refused samples", "accepted", p.Accepted, "rejected", p.Rejected, "errors", firstErrors(p.Errors))
				return
			}
			s.answered(sn, n, 0, n)
			s.log.Error("simulator: ingest refused the request", "status", a.code, "answer", clip(a.body))
			return
		}
		if ctx.Err() != nil {
			s.dropped.Add(float64(n))
			return
		}
		if !sn.outage {
			sn.outage = true
			s.log.Warn("simulator: ingest endpoint unavailable; retrying", "url", s.url, "status", a.code, "err", err)
		}
		s.retries.Inc()
		wait := max(backoff, a.retryAfter)
		wait = min(wait, s.cfg.RetryMax)
		backoff = min(2*backoff, s.cfg.RetryMax)
		select {
		case <-ctx.Done():
			s.dropped.Add(float64(n))
			return
		case <-time.After(wait):
		}
	}
}

func (s *Simulator) answered(sn *sendState, n, accepted, refused int) {
	if sn.outage {
		sn.outage = false
		s.log.Info("simulator: ingest endpoint reachable again")
	}
	sn.samples += n
	s.sent.Add(float64(n))
	s.accepted.Add(float64(accepted))
	s.refused.Add(float64(refused))
}

// encode builds the request body of sn.buf: the tenant at the top; patient,
// device and a per-device message id on each sample.
func (s *Simulator) encode(sn *sendState) ([]byte, error) {
	req := httpjson.Request{Tenant: s.cfg.Tenant, Samples: make([]httpjson.Sample, len(sn.buf))}
	prefix := "-" + sn.runID + "-" + strconv.Itoa(sn.requests)
	ids := map[string]string{}
	for i, r := range sn.buf {
		id, ok := ids[r.Device]
		if !ok {
			id = r.Device + prefix
			ids[r.Device] = id
		}
		req.Samples[i] = httpjson.Sample{Patient: r.Patient, Device: r.Device, MessageID: id, Metric: r.Metric,
			Value: r.Value, Unit: r.Unit, TimeMs: r.TimeMs, Seq: r.Seq}
	}
	return json.Marshal(req)
}

// answer is what the endpoint said to one request.
type answer struct {
	code int
	// body is the answer, bounded to 1 MiB.
	body []byte
	// retryAfter is the Retry-After of a 503/429, 0 when absent.
	retryAfter time.Duration
}

// post sends one request; it returns the answer, or the transport error.
func (s *Simulator) post(ctx context.Context, body []byte) (answer, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.url, bytes.NewReader(body))
	if err != nil {
		return answer{}, fmt.Errorf("building request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.client.Do(req)
	if err != nil {
		s.requests.WithLabelValues("error").Inc()
		return answer{}, fmt.Errorf("posting samples: %w", err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	s.requests.WithLabelValues(strconv.Itoa(resp.StatusCode)).Inc()
	if err != nil {
		return answer{}, fmt.Errorf("reading answer: %w", err)
	}
	a := answer{code: resp.StatusCode, body: out}
	if secs, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && secs > 0 {
		a.retryAfter = time.Duration(secs) * time.Second
	}
	return a, nil
}

func firstErrors(errs []httpjson.ProblemError) string {
	var b strings.Builder
	for i, e := range errs {
		if i == 3 {
			b.WriteString(" …")
			break
		}
		fmt.Fprintf(&b, "%s %s: %s; ", e.Field, e.Reason, e.Message)
	}
	return b.String()
}

func clip(b []byte) string {
	if len(b) > 300 {
		return string(b[:300]) + "…"
	}
	return string(b)
}

// Close releases the simulator's idle connections; it is idempotent. Stop
// Run by cancelling its context.
func (s *Simulator) Close(context.Context) error {
	s.closeOnce.Do(s.transport.CloseIdleConnections)
	return nil
}
