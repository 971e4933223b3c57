package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/vigilhealth/vigil/internal/testenv"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

// The platform serves the FHIR endpoints on its HTTP API and the embedded
// MQTT broker (the short version of TestMQTTExactlyOnceAcrossRestart): an
// Observation POSTed to /fhir/Observation is answered 201 and lands in
// ClickHouse; a Bundle gets a batch-response, refusing a non-vital-sign;
// a QoS 1 MQTT publish lands in ClickHouse with source mqtt.
func TestGatewaysWired(t *testing.T) {
	brokerAddr, chAddr := testenv.Kafka(t), testenv.ClickHouse(t)
	base, p := startPlatform(t, brokerAddr, chAddr, testenv.Logger(t))

	// The stages start concurrently: /readyz turns ready once the broker
	// listens, as a load balancer would poll it.
	var ready []byte
	for deadline := time.Now().Add(10 * time.Second); ; {
		resp, err := http.Get(base + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		ready, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.Contains(string(ready), `"name":"mqtt","ok":true`) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(string(ready), `"name":"mqtt","ok":true`) {
		t.Errorf("/readyz does not report the MQTT broker ready within 10 s: %s", ready)
	}

	at := time.Now().Add(-time.Minute).UTC().Truncate(time.Second)
	obs := func(code string, value float64, unit string) map[string]any {
		return map[string]any{
			"resourceType": "Observation", "status": "final",
			"category": []any{map[string]any{"coding": []any{map[string]any{
				"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}}}},
			"code":              map[string]any{"coding": []any{map[string]any{"system": "http://loinc.org", "code": code}}},
			"subject":           map[string]any{"reference": "Patient/fhir-p1"},
			"device":            map[string]any{"reference": "Device/monitor-3"},
			"effectiveDateTime": at.Format(time.RFC3339),
			"valueQuantity":     map[string]any{"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
		}
	}
	post := func(path string, v any) (*http.Response, []byte) {
		t.Helper()
		body, _ := json.Marshal(v)
		req, _ := http.NewRequest(http.MethodPost, base+path, bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/fhir+json")
		req.Header.Set("X-Vigil-Tenant", "st-mary")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		out, _ := io.ReadAll(resp.Body)
		return resp, out
	}

	resp, out := post("/fhir/Observation", obs("8867-4", 88, "/min"))
	if resp.StatusCode != http.StatusCreated || resp.Header.Get("Location") == "" || !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/fhir+json") {
		t.Fatalf("POST /fhir/Observation: %d %q %s", resp.StatusCode, resp.Header.Get("Location"), out)
	}
	resp, out = post("/fhir", map[string]any{"resourceType": "Bundle", "type": "batch", "entry": []any{
		map[string]any{"resource": obs("59408-5", 96, "%"), "request": map[string]any{"method": "POST", "url": "Observation"}},
		map[string]any{"resource": obs("2951-2", 140, "mmol/L"), "request": map[string]any{"method": "POST", "url": "Observation"}},
	}})
	var bundle struct {
		Type  string `json:"type"`
		Entry []struct {
			Response struct {
				Status string `json:"status"`
			} `json:"response"`
		} `json:"entry"`
	}
	if err := json.Unmarshal(out, &bundle); err != nil || resp.StatusCode != http.StatusOK || bundle.Type != "batch-response" || len(bundle.Entry) != 2 ||
		!strings.HasPrefix(bundle.Entry[0].Response.Status, "201") || !strings.HasPrefix(bundle.Entry[1].Response.Status, "4") {
		t.Fatalf("POST /fhir batch: %d %s (%v)", resp.StatusCode, out, err)
	}

	mc := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + p.cfg.MQTT.Embedded.Listen).SetClientID("watch-wired"))
	if tok := mc.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connecting to the embedded broker %s: %v", p.cfg.MQTT.Embedded.Listen, tok.Error())
	}
	defer mc.Disconnect(50)
	msg := fmt.Sprintf(`{"patient":"mqtt-p1","samples":[{"metric":"heart_rate","value":77,"time_ms":%d,"seq":1},{"metric":"spo2","value":97,"time_ms":%d,"seq":2}]}`,
		at.UnixMilli(), at.UnixMilli())
	if tok := mc.Publish("vigil/st-mary/watch-wired/samples", 1, false, msg); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("mqtt publish: %v", tok.Error())
	}

	conn, err := chsink.Open(context.Background(), p.cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if n := waitCount(t, conn, "SELECT count() FROM samples WHERE tenant = 'st-mary' AND patient = 'fhir-p1' AND source = 'fhir'", 2, 30*time.Second); n != 2 {
		t.Fatalf("fhir samples in clickhouse: %d, want 2", n)
	}
	if n := waitCount(t, conn, "SELECT count() FROM samples WHERE tenant = 'st-mary' AND patient = 'mqtt-p1' AND device = 'watch-wired' AND source = 'mqtt'", 2, 30*time.Second); n != 2 {
		t.Fatalf("mqtt samples in clickhouse: %d, want 2", n)
	}
	var hr float64
	var device string
	if err := conn.QueryRow(context.Background(), "SELECT value, device FROM samples WHERE patient = 'fhir-p1' AND metric = 'heart_rate'").Scan(&hr, &device); err != nil {
		t.Fatal(err)
	}
	if hr != 88 || device != "monitor-3" {
		t.Errorf("heart rate stored as %v from %q, want 88 from monitor-3", hr, device)
	}
}
