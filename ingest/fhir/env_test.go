package fhir

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func TestMain(m *testing.M) { testenv.Main(m) }

type env struct {
	url    string // base URL, ending in /fhir
	broker string
	cfg    config.Config
}

// start runs the FHIR handler behind a real HTTP server publishing to
// brokerAddr (a fresh kfake broker when empty).
func start(t testing.TB, brokerAddr string, mutate func(*config.Config), opts Options) *env {
	t.Helper()
	if brokerAddr == "" {
		brokerAddr = testenv.Kafka(t)
	}
	cfg := testenv.Config(t, brokerAddr, "")
	if mutate != nil {
		mutate(&cfg)
	}
	deps := stage.Deps{Metrics: prometheus.NewRegistry()}
	if tt, ok := t.(*testing.T); ok {
		deps.Log = testenv.Logger(tt)
	}
	pub, err := publish.New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	h, err := New(cfg, deps, pub, opts)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	h.Mount(mux.Handle)
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		srv.Close()
		_ = pub.Close(context.Background())
	})
	return &env{url: srv.URL + "/fhir", broker: brokerAddr, cfg: cfg}
}

func post(t testing.TB, url string, body []byte, header map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/fhir+json")
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, out
}

func outcome(t testing.TB, body []byte) *OperationOutcome {
	t.Helper()
	var oo OperationOutcome
	if err := json.Unmarshal(body, &oo); err != nil || oo.ResourceType != "OperationOutcome" || len(oo.Issue) == 0 {
		t.Fatalf("not an OperationOutcome (%v): %s", err, body)
	}
	return &oo
}

// samplesByTenant reads every sample batch on the samples topic.
func samplesByTenant(t testing.TB, e *env) map[string][]*vigilv1.SampleBatch {
	t.Helper()
	out := map[string][]*vigilv1.SampleBatch{}
	for _, r := range testenv.ReadAll(t, e.broker, e.cfg.Kafka.Topics.Samples) {
		var b vigilv1.SampleBatch
		if err := proto.Unmarshal(r.Value, &b); err != nil {
			t.Fatal(err)
		}
		if string(r.Key) != b.Tenant+"/"+b.Patient {
			t.Errorf("record key %q for %s/%s", r.Key, b.Tenant, b.Patient)
		}
		out[b.Tenant] = append(out[b.Tenant], &b)
	}
	return out
}

// lettersByTenant reads every dead letter.
func lettersByTenant(t testing.TB, e *env) map[string][]*vigilv1.DeadLetter {
	t.Helper()
	out := map[string][]*vigilv1.DeadLetter{}
	for _, r := range testenv.ReadAll(t, e.broker, e.cfg.Kafka.Topics.DeadLetter) {
		var d vigilv1.DeadLetter
		if err := proto.Unmarshal(r.Value, &d); err != nil {
			t.Fatal(err)
		}
		if string(r.Key) != "fhir" || d.Source != vigilv1.Source_SOURCE_FHIR {
			t.Errorf("dead letter key %q source %v, want fhir", r.Key, d.Source)
		}
		out[d.Tenant] = append(out[d.Tenant], &d)
	}
	return out
}

func ms(t testing.TB, rfc3339 string) int64 {
	t.Helper()
	ts, err := time.Parse(time.RFC3339, rfc3339)
	if err != nil {
		t.Fatal(err)
	}
	return ts.UnixMilli()
}
