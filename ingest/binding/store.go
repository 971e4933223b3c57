// Package binding keeps which patient a device (or a bed) is bound to, over
// time: the device/bed → patient bindings fed by HL7 ADT (admit, transfer,
// discharge) and by the binding HTTP API, so that a sample that names only
// its device or bed can be given its patient.
//
// The bindings live on a compacted Kafka topic (kafka.topics.bindings,
// default vigil.bindings.v1), one record per device keyed "<tenant>/<device>"
// whose value (vigilv1.DeviceBinding) is the device's whole recent history of
// intervals. Every process that ingests runs a Store: it reads the topic from
// the start into an in-memory index (a KTable) and then follows it, so every
// ingest instance sees every other instance's writes. A write produces the
// device's new state and returns only once this process's own reader has
// applied it (read-your-writes), so a Bind followed by a Resolve in the same
// process always sees the binding.
//
// Writes are read-modify-write of one device's state. Inside one process
// they are serialised; two processes writing the same device at the same
// moment are last-writer-wins (the topic's latest record is the state every
// reader converges on). ADT feeds for one unit normally come through one
// interface engine connection, which keeps that rare.
package binding

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/clock"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// SchemaVersion is the contract version of the DeviceBinding records written.
const SchemaVersion = 1

// MaxIntervals bounds the history kept per device; older intervals are
// dropped (counted in vigil_binding_intervals_dropped_total).
const MaxIntervals = 32

// Sources of a binding.
const (
	SourceADT = "adt"
	SourceAPI = "api"
)

// ErrClosed is returned by writes after Close.
var ErrClosed = errors.New("binding store closed")

// BedKey is the device id under which a bed's binding is kept:
// "bed:<point of care>/<room>/<bed>" with empty parts omitted (HL7 PV1-3
// components 1, 2 and 3), e.g. BedKey("ICU1", "12", "A") = "bed:ICU1/12/A"
// and BedKey("ICU1", "", "7") = "bed:ICU1/7". It returns "" when all parts
// are empty.
func BedKey(pointOfCare, room, bed string) string {
	parts := make([]string, 0, 3)
	for _, p := range []string{pointOfCare, room, bed} {
		if p = strings.TrimSpace(p); p != "" {
			parts = append(parts, p)
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return "bed:" + strings.Join(parts, "/")
}

// Binding is one write: bind Device of Tenant to Patient over
// [FromMs, ToMs) (ToMs 0 = open), set by Source ("adt" or "api") on behalf of
// SetBy (a user, a sending facility, a message control id).
type Binding struct {
	Tenant, Device, Patient string
	FromMs, ToMs            int64
	Source, SetBy           string
}

// Interval is one stored binding interval of a device: Patient over
// [FromMs, ToMs), ToMs 0 meaning still open.
type Interval struct {
	Patient   string `json:"patient"`
	FromMs    int64  `json:"from_ms"`
	ToMs      int64  `json:"to_ms,omitempty"`
	Source    string `json:"source"`
	SetBy     string `json:"set_by,omitempty"`
	UpdatedMs int64  `json:"updated_ms"`
	// EndSource is who ended the interval ("adt", "api"), when ended by a
	// release; a bind that cuts an earlier interval leaves it empty.
	EndSource string `json:"end_source,omitempty"`
}

// Covers reports whether the interval holds at atMs.
func (iv Interval) Covers(atMs int64) bool {
	return iv.FromMs <= atMs && (iv.ToMs == 0 || atMs < iv.ToMs)
}

type devKey struct{ tenant, device string }

// Store is the binding table of one process (see the package
// documentation). Resolve and Get are safe for concurrent use and never
// block on Kafka; the writes (Bind, Release, ReleasePatient) are safe for
// concurrent use and block until their record is in Kafka and applied here.
type Store struct {
	cl      *kgo.Client
	topic   string
	log     *slog.Logger
	clock   clock.Clock
	timeout time.Duration

	// mu guards index; Resolve takes it for reading.
	mu    sync.RWMutex
	index map[devKey][]Interval

	// progress is what the reader has applied: next offset per partition.
	progMu  sync.Mutex
	applied map[int32]int64
	// targets are the end offsets the initial catch-up reads up to (nil
	// until listed).
	targets map[int32]int64
	changed chan struct{} // closed and replaced whenever applied moves
	runErr  error         // set when Run stopped with an error
	stopped bool          // Run returned
	ready   chan struct{} // closed once the initial catch-up is done
	isReady atomic.Bool   // ready is closed (the fast path of Resolve)
	started atomic.Bool
	writeMu sync.Mutex // serialises read-modify-write of this process
	closeMu sync.Mutex
	closed  bool
	runDone chan struct{}

	m metrics
}

type metrics struct {
	applied  prometheus.Counter
	devices  prometheus.Gauge
	writes   *prometheus.CounterVec
	dropped  prometheus.Counter
	resolved *prometheus.CounterVec
	bad      prometheus.Counter
	hit      prometheus.Counter
	miss     prometheus.Counter
}

// New creates a Store for cfg (brokers, kafka.topics.bindings,
// kafka.produce_timeout) and registers its metrics on deps.Metrics. It
// contacts nothing; Run reads the topic.
func New(cfg config.Config, deps stage.Deps) (*Store, error) {
	deps = deps.WithDefaults()
	if len(cfg.Kafka.Brokers) == 0 {
		return nil, errors.New("creating binding store: no kafka brokers configured")
	}
	if cfg.Kafka.Topics.Bindings == "" {
		return nil, errors.New("creating binding store: kafka.topics.bindings is empty")
	}
	s := &Store{
		topic:   cfg.Kafka.Topics.Bindings,
		log:     deps.Log,
		clock:   deps.Clock,
		timeout: cfg.Kafka.ProduceTimeout,
		index:   map[devKey][]Interval{},
		applied: map[int32]int64{},
		changed: make(chan struct{}),
		ready:   make(chan struct{}),
		runDone: make(chan struct{}),
	}
	s.m = metrics{
		applied: prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_binding_records_applied_total",
			Help: "Binding records read from the bindings topic into this process's index."}),
		devices: prometheus.NewGauge(prometheus.GaugeOpts{Name: "vigil_binding_devices",
			Help: "Devices and beds with a binding history in this process's index."}),
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_binding_writes_total",
			Help: "Binding writes by operation (bind, release, release_patient, adt_admit, adt_transfer, adt_update; an ADT discharge counts as release_patient) and outcome (ok, noop, error)."}, []string{"op", "outcome"}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_binding_intervals_dropped_total",
			Help: "Old binding intervals dropped because a device's history exceeded its bound."}),
		bad: prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_binding_records_invalid_total",
			Help: "Records of the bindings topic that could not be decoded and were skipped."}),
		resolved: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_binding_resolve_total",
			Help: "Device/bed → patient look-ups, by result (hit, miss)."}, []string{"result"}),
	}
	s.m.hit, s.m.miss = s.m.resolved.WithLabelValues("hit"), s.m.resolved.WithLabelValues("miss")
	if err := stage.Register(deps.Metrics, "binding store metrics", s.m.applied, s.m.devices, s.m.writes,
		s.m.dropped, s.m.bad, s.m.resolved); err != nil {
		return nil, err
	}
	opts := append(bus.ClientOpts(cfg.Kafka, deps.Log),
		kgo.ConsumeTopics(s.topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.RecordDeliveryTimeout(max(cfg.Kafka.ProduceTimeout, time.Second)),
		kgo.FetchMaxWait(200*time.Millisecond),
	)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("creating binding store kafka client: %w", err)
	}
	s.cl = cl
	return s, nil
}

// Run reads the bindings topic from the start into the index, marks the
// store ready once it reached the end offsets it found at start, and then
// follows the topic until ctx ends (returning nil) or Kafka fails
// permanently. Call it once.
func (s *Store) Run(ctx context.Context) error {
	if !s.started.CompareAndSwap(false, true) {
		return errors.New("binding store: Run called twice")
	}
	err := s.run(ctx)
	s.progMu.Lock()
	s.stopped, s.runErr = true, err
	close(s.changed)
	s.changed = make(chan struct{})
	s.progMu.Unlock()
	close(s.runDone)
	return err
}

func (s *Store) run(ctx context.Context) error {
	targets, err := s.endOffsets(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	caughtUp := func() bool {
		for p, end := range targets {
			if s.applied[p] < end {
				return false
			}
		}
		return true
	}
	s.progMu.Lock()
	s.targets = targets
	if caughtUp() {
		s.markReady()
		targets = nil
	}
	s.progMu.Unlock()
	for {
		fs := s.cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if fs.IsClientClosed() {
			return nil
		}
		for _, e := range fs.Errors() {
			if errors.Is(e.Err, context.Canceled) {
				continue
			}
			// The client retries transient errors itself; what reaches
			// here is logged and the loop goes on polling.
			s.log.Warn("reading bindings topic", "partition", e.Partition, "err", e.Err)
		}
		recs := fs.Records()
		if len(recs) == 0 {
			continue
		}
		s.apply(recs)
		s.progMu.Lock()
		for _, r := range recs {
			if r.Offset+1 > s.applied[r.Partition] {
				s.applied[r.Partition] = r.Offset + 1
			}
		}
		if targets != nil && caughtUp() {
			s.markReady()
			targets = nil
			s.log.Info("binding store caught up", "devices", s.Len())
		}
		close(s.changed)
		s.changed = make(chan struct{})
		s.progMu.Unlock()
	}
}

func (s *Store) markReady() {
	s.isReady.Store(true)
	close(s.ready)
}

// endOffsets lists the bindings topic's end offsets: the catch-up target.
// The topic is written without transactions, so the record before each end
// offset is a real record that the reader will see (compaction never
// removes a partition's last record).
func (s *Store) endOffsets(ctx context.Context) (map[int32]int64, error) {
	for {
		ends, err := kadm.NewClient(s.cl).ListEndOffsets(ctx, s.topic)
		if err == nil {
			err = ends.Error()
		}
		if err == nil {
			out := map[int32]int64{}
			ends.Each(func(o kadm.ListedOffset) {
				if o.Offset > 0 {
					out[o.Partition] = o.Offset
				}
			})
			return out, nil
		}
		s.log.Warn("listing bindings topic end offsets; retrying", "topic", s.topic, "err", err)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// apply decodes records into the index. Undecodable records are counted and
// skipped (the topic is Vigil's own; a bad record is a bug, not data).
func (s *Store) apply(recs []*kgo.Record) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range recs {
		var db vigilv1.DeviceBinding
		if err := proto.Unmarshal(r.Value, &db); err != nil || db.Device == "" {
			s.m.bad.Inc()
			s.log.Warn("skipping invalid binding record", "partition", r.Partition, "offset", r.Offset, "err", err)
			continue
		}
		k := devKey{db.Tenant, db.Device}
		if len(db.Intervals) == 0 {
			delete(s.index, k)
			continue
		}
		ivs := make([]Interval, len(db.Intervals))
		for i, iv := range db.Intervals {
			ivs[i] = Interval{Patient: iv.Patient, FromMs: iv.FromMs, ToMs: iv.ToMs, Source: iv.Source,
				SetBy: iv.SetBy, UpdatedMs: iv.UpdatedMs, EndSource: iv.EndSource}
		}
		slices.SortStableFunc(ivs, func(a, b Interval) int { return cmp.Compare(a.FromMs, b.FromMs) })
		s.index[k] = ivs
	}
	s.m.applied.Add(float64(len(recs)))
	s.m.devices.Set(float64(len(s.index)))
}

// Ready blocks until the initial catch-up is done (nil), ctx ends or Run
// stopped before it (an error).
func (s *Store) Ready(ctx context.Context) error {
	select {
	case <-s.ready:
		return nil
	default:
	}
	select {
	case <-s.ready:
		return nil
	case <-s.runDone:
		return fmt.Errorf("binding store stopped before catching up: %w", s.stopErr())
	case <-ctx.Done():
		return fmt.Errorf("waiting for the binding store to catch up: %w", ctx.Err())
	}
}

// IsReady reports without blocking whether the initial catch-up is done.
func (s *Store) IsReady() bool { return s.isReady.Load() }

// checkWait bounds how long Check waits for the catch-up: a store that
// starts together with the HTTP server is usually caught up within
// milliseconds (an empty or small topic), and a probe arriving in between
// should not see the process as unready for that.
const checkWait = time.Second

// Check is a readiness check (httpserver.Check): nil once caught up. While
// the store is still catching up it waits for that, at most checkWait (or
// until ctx ends), and then reports how far the reader got.
func (s *Store) Check(ctx context.Context) error {
	if s.IsReady() {
		return nil
	}
	wctx, cancel := context.WithTimeout(ctx, checkWait)
	defer cancel()
	err := s.Ready(wctx)
	if err == nil {
		return nil
	}
	if wctx.Err() == nil {
		return err // Run stopped
	}
	s.progMu.Lock()
	var applied, target int64
	for p, end := range s.targets {
		applied += min(s.applied[p], end)
		target += end
	}
	listed := s.targets != nil
	s.progMu.Unlock()
	if !listed {
		return fmt.Errorf("binding store is still listing the end offsets of %s", s.topic)
	}
	return fmt.Errorf("binding store is still reading %s: %d of %d offsets applied", s.topic, applied, target)
}

func (s *Store) stopErr() error {
	s.progMu.Lock()
	defer s.progMu.Unlock()
	if s.runErr != nil {
		return s.runErr
	}
	return ErrClosed
}

// Len returns the number of devices and beds in the index.
func (s *Store) Len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.index)
}

// Resolve returns the patient bound to deviceOrBed (a device id or a BedKey)
// of tenant at event time atMs. It takes a read lock and does not allocate.
// Only before the initial catch-up does it block: it waits for it, at most
// kafka.produce_timeout (then it answers from what it has read, possibly
// missing bindings), so that samples arriving while a process starts are
// not refused as unbound.
func (s *Store) Resolve(tenant, deviceOrBed string, atMs int64) (patient string, ok bool) {
	if !s.isReady.Load() {
		ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
		_ = s.Ready(ctx)
		cancel()
	}
	s.mu.RLock()
	ivs := s.index[devKey{tenant, deviceOrBed}]
	// Newest first: live samples fall in the last interval.
	for i := len(ivs) - 1; i >= 0; i-- {
		if ivs[i].Covers(atMs) {
			patient, ok = ivs[i].Patient, true
			break
		}
		if ivs[i].ToMs != 0 && ivs[i].ToMs <= atMs {
			break // intervals do not overlap: nothing older covers atMs
		}
	}
	s.mu.RUnlock()
	if ok {
		s.m.hit.Inc()
	} else {
		s.m.miss.Inc()
	}
	return patient, ok
}

// Get returns a copy of the binding history of device, oldest first (nil
// when there is none). The caller owns the slice.
func (s *Store) Get(tenant, device string) []Interval {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Clone(s.index[devKey{tenant, device}])
}

// Bind binds b.Device to b.Patient from b.FromMs: whatever interval of the
// device covers FromMs ends at FromMs, and the new interval opens there. A
// later interval that already exists is kept: an open new interval ends
// where it starts; a bounded one (ToMs set) takes precedence over the part
// of later intervals it covers. Binding a device to the patient it is
// already bound to from the same time is a no-op. Bind blocks until the
// record is in Kafka and applied to this process's index.
func (s *Store) Bind(ctx context.Context, b Binding) error {
	if err := checkBinding(b); err != nil {
		s.m.writes.WithLabelValues("bind", "error").Inc()
		return err
	}
	return s.write(ctx, "bind", func(now int64) []update {
		cur := s.Get(b.Tenant, b.Device)
		next, changed := bind(cur, Interval{Patient: b.Patient, FromMs: b.FromMs, ToMs: b.ToMs, Source: b.Source,
			SetBy: b.SetBy, UpdatedMs: now})
		if !changed {
			return nil
		}
		return []update{{b.Tenant, b.Device, next}}
	})
}

// Release ends the interval of device that covers atMs at atMs (an interval
// that starts at atMs is removed). Nothing bound at atMs is a no-op, so a
// retried release succeeds. It blocks like Bind.
func (s *Store) Release(ctx context.Context, tenant, device string, atMs int64, source string) error {
	if tenant == "" || device == "" {
		s.m.writes.WithLabelValues("release", "error").Inc()
		return errors.New("releasing binding: tenant and device are required")
	}
	return s.write(ctx, "release", func(now int64) []update {
		next, changed := release(s.Get(tenant, device), atMs, "", now, source)
		if !changed {
			return nil
		}
		return []update{{tenant, device, next}}
	})
}

// ReleasePatient ends, at atMs, every interval of tenant's devices and beds
// bound to patient that covers atMs (a discharge). It scans the tenant's
// devices (discharges are rare; Resolve stays a map look-up). It blocks like
// Bind, until every changed device is applied.
func (s *Store) ReleasePatient(ctx context.Context, tenant, patient string, atMs int64, source string) error {
	if tenant == "" || patient == "" {
		s.m.writes.WithLabelValues("release_patient", "error").Inc()
		return errors.New("releasing patient bindings: tenant and patient are required")
	}
	return s.write(ctx, "release_patient", func(now int64) []update {
		s.mu.RLock()
		var devs []string
		for k, ivs := range s.index {
			if k.tenant != tenant {
				continue
			}
			for _, iv := range ivs {
				if iv.Patient == patient && iv.Covers(atMs) {
					devs = append(devs, k.device)
					break
				}
			}
		}
		s.mu.RUnlock()
		slices.Sort(devs)
		var ups []update
		for _, d := range devs {
			if next, changed := release(s.Get(tenant, d), atMs, patient, now, source); changed {
				ups = append(ups, update{tenant, d, next})
			}
		}
		return ups
	})
}

type update struct {
	tenant, device string
	ivs            []Interval
}

// write runs compute under the process's write lock, produces the device
// states it returns and waits until the reader applied them.
func (s *Store) write(ctx context.Context, op string, compute func(now int64) []update) error {
	err := s.doWrite(ctx, op, compute)
	if err != nil {
		s.m.writes.WithLabelValues(op, "error").Inc()
	}
	return err
}

func (s *Store) doWrite(ctx context.Context, op string, compute func(now int64) []update) error {
	s.closeMu.Lock()
	closed := s.closed
	s.closeMu.Unlock()
	if closed {
		return ErrClosed
	}
	if err := s.Ready(ctx); err != nil {
		return err
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	now := s.clock.Now().UnixMilli()
	ups := compute(now)
	if len(ups) == 0 {
		s.m.writes.WithLabelValues(op, "noop").Inc()
		return nil
	}
	pctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	recs := make([]*kgo.Record, 0, len(ups))
	for _, u := range ups {
		if dropped := len(u.ivs) - MaxIntervals; dropped > 0 {
			u.ivs = u.ivs[dropped:]
			s.m.dropped.Add(float64(dropped))
			s.log.Info("binding history bounded: oldest intervals dropped", "tenant", u.tenant, "device", u.device, "dropped", dropped)
		}
		db := &vigilv1.DeviceBinding{SchemaVersion: SchemaVersion, Tenant: u.tenant, Device: u.device, UpdatedMs: now}
		for _, iv := range u.ivs {
			db.Intervals = append(db.Intervals, &vigilv1.BindingInterval{Patient: iv.Patient, FromMs: iv.FromMs,
				ToMs: iv.ToMs, Source: iv.Source, SetBy: iv.SetBy, UpdatedMs: iv.UpdatedMs, EndSource: iv.EndSource})
		}
		val, err := proto.Marshal(db)
		if err != nil {
			return fmt.Errorf("encoding device binding: %w", err)
		}
		recs = append(recs, &kgo.Record{Topic: s.topic, Key: bus.PatientKey(u.tenant, u.device), Value: val})
	}
	res := s.cl.ProduceSync(pctx, recs...)
	if err := res.FirstErr(); err != nil {
		return fmt.Errorf("writing %d device bindings to %s: %w", len(recs), s.topic, err)
	}
	for _, r := range res {
		if err := s.waitApplied(pctx, r.Record.Partition, r.Record.Offset); err != nil {
			return err
		}
	}
	s.m.writes.WithLabelValues(op, "ok").Inc()
	return nil
}

// waitApplied blocks until the reader applied offset of partition.
func (s *Store) waitApplied(ctx context.Context, partition int32, offset int64) error {
	for {
		s.progMu.Lock()
		done, stopped, ch := s.applied[partition] > offset, s.stopped, s.changed
		s.progMu.Unlock()
		if done {
			return nil
		}
		if stopped {
			return fmt.Errorf("binding written but not yet visible: %w", s.stopErr())
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for the binding store to apply its own write: %w", ctx.Err())
		}
	}
}

// Close stops the reader (Run returns) and closes the Kafka client, after
// in-flight writes finished (within ctx). It is idempotent.
func (s *Store) Close(ctx context.Context) error {
	s.closeMu.Lock()
	if s.closed {
		s.closeMu.Unlock()
		return nil
	}
	s.closed = true
	s.closeMu.Unlock()
	locked := make(chan struct{})
	go func() { s.writeMu.Lock(); close(locked) }()
	select {
	case <-locked:
		defer s.writeMu.Unlock()
	case <-ctx.Done():
		s.log.Warn("closing binding store: a write is still in flight")
	}
	s.cl.Close()
	return nil
}

func checkBinding(b Binding) error {
	var errs []error
	if b.Tenant == "" || strings.Contains(b.Tenant, "/") {
		errs = append(errs, errors.New("tenant: must be set, without '/'"))
	}
	if b.Device == "" {
		errs = append(errs, errors.New("device: must be set"))
	}
	if b.Patient == "" {
		errs = append(errs, errors.New("patient: must be set"))
	}
	if b.FromMs < 0 {
		errs = append(errs, errors.New("from: must not be before the Unix epoch"))
	}
	if b.ToMs != 0 && b.ToMs <= b.FromMs {
		errs = append(errs, errors.New("to: must be after from"))
	}
	if err := errors.Join(errs...); err != nil {
		return &InvalidError{Err: err}
	}
	return nil
}

// IsRetriable reports whether a failed write (Bind, Release,
// ReleasePatient, ApplyADT) may succeed if retried: an *InvalidError never
// does; ErrClosed (this process is stopping) and transient Kafka failures
// (timeouts, brokers unavailable: publish.Classify) do. A retried write is
// safe: writes are idempotent.
func IsRetriable(err error) bool {
	var inv *InvalidError
	switch {
	case err == nil, errors.As(err, &inv):
		return false
	case errors.Is(err, ErrClosed):
		return true
	}
	return publish.Classify(err)
}

// InvalidError is a write refused for its arguments (permanent); its message
// names the field.
type InvalidError struct{ Err error }

// Error returns the cause.
func (e *InvalidError) Error() string { return "invalid binding: " + e.Err.Error() }

// Unwrap returns the cause.
func (e *InvalidError) Unwrap() error { return e.Err }

// bind returns cur with nw applied (see Store.Bind) and whether it changed.
func bind(cur []Interval, nw Interval) ([]Interval, bool) {
	for _, iv := range cur {
		if iv.Patient != nw.Patient {
			continue
		}
		if iv.FromMs == nw.FromMs && iv.ToMs == nw.ToMs {
			return cur, false // the same binding again
		}
		if nw.ToMs == 0 && iv.ToMs == 0 && iv.FromMs <= nw.FromMs {
			return cur, false // already bound to this patient, still open
		}
	}
	out := make([]Interval, 0, len(cur)+2)
	for _, iv := range cur {
		reachesPastEnd := nw.ToMs != 0 && (iv.ToMs == 0 || iv.ToMs > nw.ToMs)
		switch {
		case iv.FromMs < nw.FromMs:
			if iv.ToMs != 0 && iv.ToMs <= nw.FromMs {
				out = append(out, iv) // over before the new one starts
				continue
			}
			// Covers the new start: ends there; with a bounded new
			// interval, what reached beyond its end resumes there.
			head := iv
			head.ToMs, head.UpdatedMs = nw.FromMs, nw.UpdatedMs
			out = append(out, head)
			if reachesPastEnd {
				iv.FromMs = nw.ToMs
				out = append(out, iv)
			}
		case iv.FromMs > nw.FromMs && nw.ToMs == 0:
			// A later binding is kept; the open new one ends where it
			// starts (see the pass below).
			out = append(out, iv)
		default:
			// Starts with or inside the new interval, which overrides
			// what it covers.
			if nw.ToMs != 0 && iv.FromMs >= nw.ToMs {
				out = append(out, iv)
			} else if reachesPastEnd {
				iv.FromMs = nw.ToMs
				out = append(out, iv)
			}
		}
	}
	out = append(out, nw)
	slices.SortStableFunc(out, func(a, b Interval) int { return cmp.Compare(a.FromMs, b.FromMs) })
	for i := 0; i+1 < len(out); i++ {
		if out[i].ToMs == 0 || out[i].ToMs > out[i+1].FromMs {
			out[i].ToMs = out[i+1].FromMs
		}
	}
	return slices.DeleteFunc(out, func(iv Interval) bool { return iv.ToMs != 0 && iv.ToMs <= iv.FromMs }), true
}

// release ends the interval covering atMs (of patient, when not empty).
func release(cur []Interval, atMs int64, patient string, now int64, source string) ([]Interval, bool) {
	out := slices.Clone(cur)
	changed := false
	for i := range out {
		iv := &out[i]
		if !iv.Covers(atMs) || (patient != "" && iv.Patient != patient) {
			continue
		}
		iv.ToMs, iv.UpdatedMs, iv.EndSource, changed = atMs, now, source, true
	}
	if !changed {
		return cur, false
	}
	return slices.DeleteFunc(out, func(iv Interval) bool { return iv.ToMs <= iv.FromMs }), true
}

// ADTKind is the kind of an ADT event, as ApplyADT applies it.
type ADTKind string

// ADT event kinds, named by what they do; the HL7 v2 trigger events that
// map onto each are given.
const (
	// ADTAdmit (A01 admit; also A04 register, A13 cancel discharge): the
	// patient occupies Bed from the event time.
	ADTAdmit ADTKind = "admit"
	// ADTTransfer (A02): the patient leaves PriorBed (PV1-6) and occupies
	// Bed (PV1-3) from the event time.
	ADTTransfer ADTKind = "transfer"
	// ADTDischarge (A03; also A11 cancel admit): every binding of the
	// patient in force at the event time ends then.
	ADTDischarge ADTKind = "discharge"
	// ADTUpdate (A08): patient information changed; when it carries a bed
	// the patient is not bound to, it is applied as an admit to that bed
	// (the feed's latest word on where the patient is); without a bed it
	// changes nothing.
	ADTUpdate ADTKind = "update"
)

// ADTEvent is one ADT event for ApplyADT.
type ADTEvent struct {
	Kind    ADTKind
	Tenant  string
	Patient string // PID-3
	// Bed is the BedKey of the assigned location (PV1-3); required by a
	// transfer, optional for admit and update (nothing to bind without
	// it), ignored by a discharge.
	Bed string
	// PriorBed is the BedKey of the prior location (PV1-6) of a transfer;
	// optional (see ApplyADT).
	PriorBed string
	// AtMs is when the event took effect (EVN-2, else MSH-7), Unix ms.
	AtMs int64
	// SetBy names the message, e.g. "<MSH-4> ADT^A02 <MSH-10>"; it is
	// kept on the intervals the event opens.
	SetBy string
}

// ApplyADT applies one ADT event to the bindings as one write: every device
// or bed it changes is produced together and the call returns once all of
// them are in Kafka and applied here (or with an error; it is then safe to
// retry the same event: applying an event twice changes nothing the second
// time). A patient occupies one bed: admit, transfer and update bind Bed to
// the patient from AtMs (cutting whoever occupied it then) and end, at AtMs,
// the patient's bindings to any other bed ("bed:" keys) and to PriorBed;
// bindings of the patient to devices by id (monitors, wearables bound over
// the API) are kept. An admit, transfer or update whose interval exists
// already (same bed, patient and time: a resent message) changes nothing,
// even if a later event ended that interval. Releases are per patient: a prior bed already taken by
// someone else keeps its new occupant, whatever order the events come in.
// A discharge ends every binding of the patient, beds and devices, in force
// at AtMs, so that no device goes on filing samples under a discharged
// patient. Invalid events (no tenant or patient, a transfer without a bed,
// a negative time, an unknown kind) return an *InvalidError naming the
// field; IsRetriable tells which failures may be retried.
func (s *Store) ApplyADT(ctx context.Context, ev ADTEvent) error {
	op := "adt_" + string(ev.Kind)
	if err := checkADT(ev); err != nil {
		s.m.writes.WithLabelValues("adt", "error").Inc()
		return err
	}
	if ev.Kind == ADTDischarge {
		return s.ReleasePatient(ctx, ev.Tenant, ev.Patient, ev.AtMs, SourceADT)
	}
	if ev.Bed == "" {
		// An admit or update without a location: nothing to bind.
		s.m.writes.WithLabelValues(op, "noop").Inc()
		return nil
	}
	return s.write(ctx, op, func(now int64) []update {
		var ups []update
		// The patient's other beds, and the prior bed, are left at AtMs.
		s.mu.RLock()
		var leave []string
		for k, ivs := range s.index {
			if k.tenant != ev.Tenant || k.device == ev.Bed || (k.device != ev.PriorBed && !strings.HasPrefix(k.device, "bed:")) {
				continue
			}
			for _, iv := range ivs {
				if iv.Patient == ev.Patient && iv.Covers(ev.AtMs) {
					leave = append(leave, k.device)
					break
				}
			}
		}
		s.mu.RUnlock()
		slices.Sort(leave)
		for _, d := range leave {
			if next, changed := release(s.Get(ev.Tenant, d), ev.AtMs, ev.Patient, now, SourceADT); changed {
				ups = append(ups, update{ev.Tenant, d, next})
			}
		}
		cur := s.Get(ev.Tenant, ev.Bed)
		if slices.ContainsFunc(cur, func(iv Interval) bool { return iv.Patient == ev.Patient && iv.FromMs == ev.AtMs }) {
			// This event was applied before (a resent message): what
			// later events did to the interval it opened stands.
			return ups
		}
		next, changed := bind(cur, Interval{Patient: ev.Patient, FromMs: ev.AtMs,
			Source: SourceADT, SetBy: ev.SetBy, UpdatedMs: now})
		if changed {
			ups = append(ups, update{ev.Tenant, ev.Bed, next})
		}
		return ups
	})
}

func checkADT(ev ADTEvent) error {
	var errs []error
	switch ev.Kind {
	case ADTAdmit, ADTTransfer, ADTDischarge, ADTUpdate:
	default:
		errs = append(errs, fmt.Errorf("kind: %q is not admit, transfer, discharge or update", ev.Kind))
	}
	if ev.Tenant == "" || strings.Contains(ev.Tenant, "/") {
		errs = append(errs, errors.New("tenant: must be set, without '/'"))
	}
	if ev.Patient == "" {
		errs = append(errs, errors.New("patient: must be set (PID-3)"))
	}
	if ev.Kind == ADTTransfer && ev.Bed == "" {
		errs = append(errs, errors.New("bed: a transfer needs the new location (PV1-3)"))
	}
	if ev.AtMs < 0 {
		errs = append(errs, errors.New("at: must not be before the Unix epoch"))
	}
	if err := errors.Join(errs...); err != nil {
		return &InvalidError{Err: err}
	}
	return nil
}
