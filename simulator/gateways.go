package simulator

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/internal/config"
)

// MLLP framing bytes (HL7 v2 Minimal Lower Layer Protocol).
const (
	mllpStart = 0x0b
	mllpEnd   = 0x1c
	mllpCR    = 0x0d
)

// gateways sends readings the way a hospital's integration engines would.
// Each gateway is used by the simulator's one sending goroutine; the MLLP
// gateway fans a tick's messages out over its connections.
type gateways struct {
	cfg    config.SimGateways
	tenant string
	target string
	log    *slog.Logger
	client *http.Client

	// messages counts gateway messages by gateway and answer (AA, AE, AR,
	// 201, puback, error...); faults counts injected faulty messages.
	messages *prometheus.CounterVec
	faults   *prometheus.CounterVec

	rng   *rand.Rand
	ctl   uint64
	runID string
	// admitted is when each bed's patient was admitted (ADT^A01 sent);
	// moved tells which were transferred (ADT^A02 sent).
	admitted map[string]time.Time
	moved    map[string]bool

	conns []*mllpConn
	mq    mqtt.Client
}

func newGateways(cfg config.Simulator, log *slog.Logger, client *http.Client, runID string) *gateways {
	return &gateways{
		cfg: cfg.Gateways, tenant: cfg.Tenant, target: strings.TrimRight(cfg.Target, "/"), log: log, client: client,
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_simulator_gateway_messages_total",
			Help: "Messages the simulated gateways sent, by gateway (mllp, mqtt, fhir) and answer (AA/AE/AR, HTTP code, puback, error)."},
			[]string{"gateway", "answer"}),
		faults: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "vigil_simulator_faults_injected_total",
			Help: "Faulty messages the simulated gateways injected, by gateway and kind (malformed, unmapped)."},
			[]string{"gateway", "kind"}),
		rng:      rand.New(rand.NewPCG(uint64(cfg.Seed), 0x5eed)),
		runID:    runID,
		admitted: map[string]time.Time{},
		moved:    map[string]bool{},
	}
}

// active reports whether any gateway other than HTTP is configured.
func (g *gateways) active() bool { return g.cfg.MLLP != "" || g.cfg.MQTT != "" || g.cfg.FHIR }

// fault draws whether to inject a faulty message now, and which kind.
func (g *gateways) fault() (inject bool, malformed bool) {
	if g.cfg.FaultRate <= 0 || g.rng.Float64() >= g.cfg.FaultRate {
		return false, false
	}
	return true, g.rng.IntN(2) == 0
}

func (g *gateways) nextCtl(prefix string) string {
	g.ctl++
	return prefix + "-" + g.runID + "-" + strconv.FormatUint(g.ctl, 10)
}

// route sends what its gateways carry and returns the readings left for the
// HTTP JSON API (rs is reused).
func (g *gateways) route(ctx context.Context, rs []Reading) []Reading {
	if !g.active() {
		return rs
	}
	var beds, wear, spot []Reading
	rest := rs[:0:0]
	for _, r := range rs {
		switch {
		case isBed(r.Device) && g.cfg.FHIR && r.Metric == "body_temperature":
			spot = append(spot, r)
		case isBed(r.Device) && g.cfg.MLLP != "" && pcdTerms[r.Metric].obx3 != "":
			beds = append(beds, r)
		case !isBed(r.Device) && g.cfg.MQTT != "":
			wear = append(wear, r)
		default:
			rest = append(rest, r)
		}
	}
	if len(beds) > 0 {
		g.sendMLLP(ctx, beds)
	}
	if len(wear) > 0 {
		g.sendMQTT(ctx, wear)
	}
	if len(spot) > 0 {
		g.sendFHIR(ctx, spot)
	}
	return rest
}

func isBed(device string) bool { return strings.HasPrefix(device, "monitor-") }

// bedNumber is the bed of monitor-NN.
func bedNumber(device string) int {
	n, _ := strconv.Atoi(strings.TrimPrefix(device, "monitor-"))
	return n
}

// --- MLLP -----------------------------------------------------------------

// mllpConn is one MLLP connection of the bed gateway, redialled on error.
type mllpConn struct {
	addr string
	c    net.Conn
	r    *bufio.Reader
}

func (c *mllpConn) close() {
	if c.c != nil {
		_ = c.c.Close()
		c.c, c.r = nil, nil
	}
}

// exchange sends one framed message and reads its ACK, within timeout.
func (c *mllpConn) exchange(ctx context.Context, msg []byte, timeout time.Duration) ([]byte, error) {
	if c.c == nil {
		d := net.Dialer{Timeout: timeout}
		conn, err := d.DialContext(ctx, "tcp", c.addr)
		if err != nil {
			return nil, fmt.Errorf("dialling mllp %s: %w", c.addr, err)
		}
		c.c, c.r = conn, bufio.NewReader(conn)
	}
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = c.c.SetDeadline(deadline)
	frame := make([]byte, 0, len(msg)+3)
	frame = append(append(append(frame, mllpStart), msg...), mllpEnd, mllpCR)
	if _, err := c.c.Write(frame); err != nil {
		c.close()
		return nil, fmt.Errorf("writing mllp frame: %w", err)
	}
	if _, err := c.r.ReadBytes(mllpStart); err != nil {
		c.close()
		return nil, fmt.Errorf("reading ack start: %w", err)
	}
	ack, err := c.r.ReadBytes(mllpEnd)
	if err != nil {
		c.close()
		return nil, fmt.Errorf("reading ack: %w", err)
	}
	if b, err := c.r.ReadByte(); err != nil || b != mllpCR {
		c.close()
		if err == nil {
			err = errors.New("frame not ended by CR")
		}
		return nil, fmt.Errorf("reading ack end: %w", err)
	}
	return ack[:len(ack)-1], nil
}

// mllpJob is one message to deliver; retry is false for injected faults,
// which are refused by design.
type mllpJob struct {
	msg   []byte
	retry bool
}

// sendMLLP sends the beds' readings as one ORU^R01 per bed and second, after
// an ADT^A01 admitting each bed's patient the first time (and an ADT^A02
// moving bed 1's patient to the neighbouring bed after ten simulated
// minutes). Messages are spread over the gateway's connections; a message
// answered AE or not answered is sent again with the same control id (the
// receiver suppresses duplicates), AR is final.
func (g *gateways) sendMLLP(ctx context.Context, rs []Reading) {
	if g.conns == nil {
		for range g.cfg.MLLPConnections {
			g.conns = append(g.conns, &mllpConn{addr: g.cfg.MLLP})
		}
	}
	var adts, orus []mllpJob
	start := 0
	for i := 1; i <= len(rs); i++ {
		if i < len(rs) && rs[i].Device == rs[start].Device && rs[i].TimeMs/1000 == rs[start].TimeMs/1000 {
			continue
		}
		group := rs[start:i]
		start = i
		dev, pat := group[0].Device, group[0].Patient
		bed := bedNumber(dev)
		at := time.UnixMilli(group[0].TimeMs)
		admittedAt, ok := g.admitted[dev]
		if !ok {
			g.admitted[dev], admittedAt = at, at
			adts = append(adts, mllpJob{msg: adtMessage(g.tenant, g.nextCtl("adt"), "A01", pat, bedLocation(bed, false), "", at), retry: true})
		}
		if bed == 1 && !g.moved[dev] && at.Sub(admittedAt) >= 10*time.Minute {
			g.moved[dev] = true
			adts = append(adts, mllpJob{msg: adtMessage(g.tenant, g.nextCtl("adt"), "A02", pat, bedLocation(bed, true), bedLocation(bed, false), at), retry: true})
		}
		inject, malformed := g.fault()
		orus = append(orus, mllpJob{msg: oruMessage(g.tenant, g.nextCtl("oru"), bedLocation(bed, g.moved[dev]), group, false), retry: true})
		if inject {
			if malformed {
				g.faults.WithLabelValues("mllp", "malformed").Inc()
				orus = append(orus, mllpJob{msg: malformedMessage(g.tenant, g.nextCtl("bad"))})
			} else {
				g.faults.WithLabelValues("mllp", "unmapped").Inc()
				orus = append(orus, mllpJob{msg: oruMessage(g.tenant, g.nextCtl("unm"), bedLocation(bed, g.moved[dev]), group[:1], true)})
			}
		}
	}
	// Admissions first, so that the receiver knows the beds before their
	// observations arrive.
	g.deliver(ctx, adts)
	g.deliver(ctx, orus)
}

// deliver sends jobs over the connections in parallel, each connection its
// share in order.
func (g *gateways) deliver(ctx context.Context, jobs []mllpJob) {
	if len(jobs) == 0 {
		return
	}
	var wg sync.WaitGroup
	n := len(g.conns)
	for ci, c := range g.conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := ci; j < len(jobs); j += n {
				g.deliverOne(ctx, c, jobs[j])
			}
		}()
	}
	wg.Wait()
}

func (g *gateways) deliverOne(ctx context.Context, c *mllpConn, job mllpJob) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		ack, err := c.exchange(ctx, job.msg, 10*time.Second)
		code, text := "error", ""
		if err == nil {
			code, text = ackCode(ack)
		}
		g.messages.WithLabelValues("mllp", code).Inc()
		switch {
		case code == "AA" || code == "CA":
			return
		case code == "AR" || code == "CR" || (!job.retry && err == nil):
			if job.retry {
				g.log.Warn("simulator: mllp message refused", "ack", code, "reason", text)
			}
			return
		}
		g.log.Debug("simulator: mllp message not accepted; retrying", "ack", code, "reason", text, "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// --- MQTT -----------------------------------------------------------------

// sendMQTT publishes each wearable's readings as one QoS 1 message of the
// HTTP JSON schema to vigil/<tenant>/<device>/samples and waits for the
// PUBACKs. The client keeps a persistent session (clean session off, a
// stable client id), so that what was not acknowledged is sent again after
// a reconnect.
func (g *gateways) sendMQTT(ctx context.Context, rs []Reading) {
	if g.mq == nil {
		opts := mqtt.NewClientOptions().AddBroker("tcp://" + g.cfg.MQTT).
			SetClientID("vigil-sim-" + g.tenant).SetCleanSession(false).
			SetAutoReconnect(true).SetConnectRetry(true).SetConnectRetryInterval(time.Second).
			SetMaxReconnectInterval(5 * time.Second).SetOrderMatters(false).SetWriteTimeout(10 * time.Second)
		g.mq = mqtt.NewClient(opts)
		g.mq.Connect() // connects in the background, retrying
	}
	byDevice := map[string][]Reading{}
	var order []string
	for _, r := range rs {
		if _, ok := byDevice[r.Device]; !ok {
			order = append(order, r.Device)
		}
		byDevice[r.Device] = append(byDevice[r.Device], r)
	}
	var tokens []mqtt.Token
	for _, dev := range order {
		body, err := encodeRequest("", g.nextCtl("mqtt"), byDevice[dev])
		if err != nil {
			g.log.Error("simulator: encoding mqtt payload", "err", err)
			continue
		}
		topic := "vigil/" + g.tenant + "/" + dev + "/samples"
		tokens = append(tokens, g.mq.Publish(topic, 1, false, body))
		if inject, malformed := g.fault(); inject {
			payload := []byte(`{"samples":[{"metric":"heart_rate","value":`)
			kind := "malformed"
			if !malformed {
				kind = "unmapped"
				payload = []byte(`{"samples":[{"patient":"` + byDevice[dev][0].Patient + `","loinc":"99999-9","value":1,"unit":"1","time":"` +
					time.UnixMilli(byDevice[dev][0].TimeMs).UTC().Format(time.RFC3339Nano) + `"}]}`)
			}
			g.faults.WithLabelValues("mqtt", kind).Inc()
			tokens = append(tokens, g.mq.Publish(topic, 1, false, payload))
		}
	}
	for _, t := range tokens {
		answer := "puback"
		select {
		case <-t.Done():
			if t.Error() != nil {
				answer = "error"
				g.log.Warn("simulator: mqtt publish failed", "err", t.Error())
			}
		case <-ctx.Done():
			return
		case <-time.After(30 * time.Second):
			// Still in the client's store: it is sent again when the
			// connection is back.
			answer = "pending"
		}
		g.messages.WithLabelValues("mqtt", answer).Inc()
	}
}

// --- FHIR -----------------------------------------------------------------

type fhirCoding struct {
	System  string `json:"system"`
	Code    string `json:"code"`
	Display string `json:"display,omitempty"`
}

type fhirObservation struct {
	ResourceType string `json:"resourceType"`
	Status       string `json:"status"`
	Category     []struct {
		Coding []fhirCoding `json:"coding"`
	} `json:"category"`
	Code struct {
		Coding []fhirCoding `json:"coding"`
	} `json:"code"`
	Subject           map[string]string `json:"subject"`
	Device            map[string]string `json:"device,omitempty"`
	EffectiveDateTime string            `json:"effectiveDateTime"`
	ValueQuantity     any               `json:"valueQuantity"`
}

// spotCheck is the Observation (vital-signs profile) of a nurse's
// temperature reading.
func spotCheck(r Reading, loinc string, value any) fhirObservation {
	o := fhirObservation{ResourceType: "Observation", Status: "final",
		Subject:           map[string]string{"reference": "Patient/" + r.Patient},
		Device:            map[string]string{"reference": "Device/" + r.Device},
		EffectiveDateTime: time.UnixMilli(r.TimeMs).UTC().Format("2006-01-02T15:04:05.000Z07:00"),
		ValueQuantity:     value,
	}
	o.Category = append(o.Category, struct {
		Coding []fhirCoding `json:"coding"`
	}{Coding: []fhirCoding{{System: "http://terminology.hl7.org/CodeSystem/observation-category", Code: "vital-signs", Display: "Vital Signs"}}})
	o.Code.Coding = []fhirCoding{{System: "http://loinc.org", Code: loinc, Display: "Body temperature"}}
	return o
}

// sendFHIR posts the spot checks as one batch Bundle to <target>/fhir.
func (g *gateways) sendFHIR(ctx context.Context, rs []Reading) {
	type entry struct {
		Resource fhirObservation   `json:"resource"`
		Request  map[string]string `json:"request"`
	}
	bundle := struct {
		ResourceType string  `json:"resourceType"`
		Type         string  `json:"type"`
		Entry        []entry `json:"entry"`
	}{ResourceType: "Bundle", Type: "batch"}
	req := map[string]string{"method": "POST", "url": "Observation"}
	for _, r := range rs {
		bundle.Entry = append(bundle.Entry, entry{Resource: spotCheck(r, "8310-5",
			map[string]any{"value": r.Value, "unit": "C", "system": "http://unitsofmeasure.org", "code": "Cel"}), Request: req})
		if inject, malformed := g.fault(); inject {
			if malformed {
				g.faults.WithLabelValues("fhir", "malformed").Inc()
				bundle.Entry = append(bundle.Entry, entry{Resource: spotCheck(r, "8310-5", "thirty-seven"), Request: req})
			} else {
				g.faults.WithLabelValues("fhir", "unmapped").Inc()
				bundle.Entry = append(bundle.Entry, entry{Resource: spotCheck(r, "99999-9",
					map[string]any{"value": 1, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1"}), Request: req})
			}
		}
	}
	body, err := json.Marshal(bundle)
	if err != nil {
		g.log.Error("simulator: encoding fhir bundle", "err", err)
		return
	}
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		hr, err := http.NewRequestWithContext(ctx, http.MethodPost, g.target+"/fhir", bytes.NewReader(body))
		if err != nil {
			return
		}
		hr.Header.Set("Content-Type", "application/fhir+json")
		hr.Header.Set("X-Vigil-Tenant", g.tenant)
		resp, err := g.client.Do(hr)
		code := "error"
		if err == nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
			_ = resp.Body.Close()
			code = strconv.Itoa(resp.StatusCode)
		}
		g.messages.WithLabelValues("fhir", code).Inc()
		if err == nil && resp.StatusCode < 500 && resp.StatusCode != http.StatusTooManyRequests {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// encodeRequest renders readings as one POST /v1/samples body.
func encodeRequest(tenant, msgID string, rs []Reading) ([]byte, error) {
	req := httpjson.Request{Tenant: tenant, Samples: make([]httpjson.Sample, len(rs))}
	for i, r := range rs {
		req.Samples[i] = httpjson.Sample{Patient: r.Patient, Device: r.Device, MessageID: msgID, Metric: r.Metric,
			Value: r.Value, Unit: r.Unit, TimeMs: r.TimeMs, Seq: r.Seq}
	}
	return json.Marshal(req)
}

// close ends the gateways' connections.
func (g *gateways) close() {
	for _, c := range g.conns {
		c.close()
	}
	if g.mq != nil {
		g.mq.Disconnect(250)
	}
}
