package alertroute

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// receiver is a real webhook receiver: it verifies the signature, checks
// the idempotency key against the body and de-duplicates on it.
type receiver struct {
	srv    *httptest.Server
	secret []byte
	// status decides the answer to attempt n (from 1) of event id; nil
	// accepts everything.
	status func(id string, n int) int
	// hold, when set, is waited on before answering (a stuck webhook).
	hold chan struct{}

	mu        sync.Mutex
	attempts  map[string][]time.Time
	headerN   map[string][]string // X-Vigil-Attempt values per event
	accepted  map[string]int      // 2xx answers per event id
	order     []string            // event ids in order of first acceptance
	badSig    int
	mismatch  int
	lastTypes map[string]string
}

func newReceiver(t *testing.T, secret string, status func(id string, n int) int) *receiver {
	r := &receiver{secret: []byte(secret), status: status, attempts: map[string][]time.Time{},
		headerN: map[string][]string{}, accepted: map[string]int{}, lastTypes: map[string]string{}}
	r.srv = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(func() {
		if r.hold != nil {
			select {
			case <-r.hold:
			default:
				close(r.hold)
			}
		}
		r.srv.Close()
	})
	return r
}

func (r *receiver) serve(w http.ResponseWriter, req *http.Request) {
	body, _ := io.ReadAll(req.Body)
	if r.hold != nil {
		select {
		case <-r.hold:
		case <-req.Context().Done():
			return
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.secret) == 0 && req.Header.Get(HeaderSignature) != "" {
		r.badSig++ // no secret: no signature expected
	} else if err := Verify(r.secret, req.Header.Get(HeaderTimestamp), req.Header.Get(HeaderSignature), body, time.Now(), 5*time.Minute); len(r.secret) > 0 && err != nil {
		r.badSig++
		http.Error(w, err.Error(), http.StatusUnauthorized)
		return
	}
	var ev vigilv1.AlertEvent
	if err := protojson.Unmarshal(body, &ev); err != nil || ev.GetEventId() != req.Header.Get(HeaderIdempotencyKey) {
		r.mismatch++
		http.Error(w, "idempotency key does not match the body", http.StatusBadRequest)
		return
	}
	id := ev.GetEventId()
	r.attempts[id] = append(r.attempts[id], time.Now())
	r.headerN[id] = append(r.headerN[id], req.Header.Get(HeaderAttempt))
	code := http.StatusNoContent
	if r.status != nil {
		code = r.status(id, len(r.attempts[id]))
	}
	if code >= 200 && code < 300 {
		if r.accepted[id] == 0 {
			r.order = append(r.order, id)
		}
		r.accepted[id]++
		r.lastTypes[id] = req.Header.Get(HeaderEventType)
	}
	w.WriteHeader(code)
	_, _ = w.Write([]byte(http.StatusText(code)))
}

func (r *receiver) snapshot() (attempts map[string][]time.Time, accepted map[string]int, order []string, bad int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	attempts = map[string][]time.Time{}
	for k, v := range r.attempts {
		attempts[k] = append([]time.Time(nil), v...)
	}
	accepted = map[string]int{}
	for k, v := range r.accepted {
		accepted[k] = v
	}
	return attempts, accepted, append([]string(nil), r.order...), r.badSig + r.mismatch
}

// event builds a lifecycle event; location "ICU1^01" gives ward "ICU1".
func event(id, alert string, typ vigilv1.AlertEventType, rule, severity, location string, atMs int64) *vigilv1.AlertEvent {
	ward, _, _ := strings.Cut(location, "^")
	return &vigilv1.AlertEvent{SchemaVersion: 1, EventId: id, AlertId: alert, Tenant: "t1", Patient: "p-" + location,
		Type: typ, Rule: rule, Severity: severity, Reason: "test", Location: location, Ward: ward,
		EventTimeMs: atMs, EmittedTimeMs: atMs, RaisedEventTimeMs: atMs}
}

func produce(t *testing.T, cfg config.Config, evs ...*vigilv1.AlertEvent) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(cfg.Kafka.Brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, ev := range evs {
		v, err := proto.Marshal(ev)
		if err != nil {
			t.Fatal(err)
		}
		if err := cl.ProduceSync(ctx, &kgo.Record{Topic: cfg.Kafka.Topics.Alerts, Key: bus.PatientKey(ev.Tenant, ev.Patient), Value: v}).FirstErr(); err != nil {
			t.Fatalf("producing alert event: %v", err)
		}
	}
}

// running is a stage started in the background.
type running struct {
	s    *Stage
	reg  *prometheus.Registry
	done chan error
	stop context.CancelFunc
}

func start(t *testing.T, cfg config.Config) *running {
	t.Helper()
	reg := prometheus.NewRegistry()
	s, err := New(cfg, stage.Deps{Log: testenv.Logger(t), Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{s: s, reg: reg, done: make(chan error, 1), stop: cancel}
	go func() { r.done <- s.Run(ctx) }()
	t.Cleanup(func() { r.shutdown(t) })
	return r
}

// shutdown cancels Run, waits for it and closes the stage; it returns
// Run's error (only the first call does).
func (r *running) shutdown(t *testing.T) error {
	t.Helper()
	if r.stop == nil {
		return nil
	}
	r.stop()
	r.stop = nil
	var err error
	select {
	case err = <-r.done:
	case <-time.After(60 * time.Second):
		t.Fatal("Run did not return within 60s of cancellation")
	}
	if cerr := r.s.Close(context.Background()); cerr != nil {
		t.Errorf("Close: %v", cerr)
	}
	if cerr := r.s.Close(context.Background()); cerr != nil {
		t.Errorf("second Close: %v", cerr)
	}
	return err
}

func waitFor(t *testing.T, what string, timeout time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// metric returns the value of the named series with exactly these labels
// (a histogram's sample count), and whether it exists.
func metric(t *testing.T, reg prometheus.Gatherer, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if !sameLabels(m.GetLabel(), labels) {
				continue
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue(), true
			case m.Gauge != nil:
				return m.Gauge.GetValue(), true
			case m.Histogram != nil:
				return float64(m.Histogram.GetSampleCount()), true
			}
		}
	}
	return 0, false
}

func histogramSum(t *testing.T, reg prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			if mf.GetName() == name && m.Histogram != nil && sameLabels(m.GetLabel(), labels) {
				return m.Histogram.GetSampleSum()
			}
		}
	}
	t.Fatalf("no histogram %s%v", name, labels)
	return 0
}

func sameLabels(got []*dto.LabelPair, want map[string]string) bool {
	if len(got) != len(want) {
		return false
	}
	for _, l := range got {
		if want[l.GetName()] != l.GetValue() {
			return false
		}
	}
	return true
}

// committed returns the group's committed offsets of the alerts topic and
// the topic's end offsets, summed over partitions.
func committed(t *testing.T, cfg config.Config) (commit, end int64) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(cfg.Kafka.Brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	offs, err := adm.FetchOffsets(ctx, cfg.Alerts.Routes.Group)
	if err != nil {
		t.Fatalf("fetching committed offsets: %v", err)
	}
	offs.Each(func(o kadm.OffsetResponse) {
		if o.Topic == cfg.Kafka.Topics.Alerts && o.At > 0 {
			commit += o.At
		}
	})
	ends, err := adm.ListEndOffsets(ctx, cfg.Kafka.Topics.Alerts)
	if err != nil {
		t.Fatal(err)
	}
	ends.Each(func(o kadm.ListedOffset) { end += o.Offset })
	return commit, end
}

// deadLetters reads the stage's letters from the dead-letter topic.
func deadLetters(t *testing.T, cfg config.Config, n int) []*vigilv1.DeadLetter {
	t.Helper()
	recs := testenv.Consume(t, cfg.Kafka.Brokers[0], cfg.Kafka.Topics.DeadLetter, n, 20*time.Second)
	var out []*vigilv1.DeadLetter
	for _, rec := range recs {
		var dl vigilv1.DeadLetter
		if err := proto.Unmarshal(rec.Value, &dl); err != nil {
			t.Fatalf("dead letter does not decode: %v", err)
		}
		if string(rec.Key) != "alertroute" {
			t.Errorf("dead letter key %q, want alertroute", rec.Key)
		}
		out = append(out, &dl)
	}
	return out
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
