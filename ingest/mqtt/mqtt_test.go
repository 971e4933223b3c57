package mqtt

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// env is a running MQTT ingest stage on a free port publishing to brokers.
type env struct {
	cfg config.Config
	svc *Service
	reg *prometheus.Registry
}

func start(t testing.TB, cfg config.Config, log bool) *env {
	t.Helper()
	reg := prometheus.NewRegistry()
	deps := stage.Deps{Metrics: reg}
	if log {
		deps.Log = testenv.Logger(t)
	}
	pub, err := publish.New(cfg, deps)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := New(cfg, deps, pub)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("mqtt Run: %v", err)
		}
		_ = svc.Close(context.Background())
		_ = pub.Close(context.Background())
	})
	for i := 0; svc.Ready(ctx) != nil; i++ {
		if i > 100 {
			t.Fatal("mqtt service not ready")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return &env{cfg: cfg, svc: svc, reg: reg}
}

func testConfig(t testing.TB, broker string) config.Config {
	cfg := testenv.Config(t, broker, "")
	cfg.MQTT.Embedded.Listen = "127.0.0.1:0"
	return cfg
}

func connect(t testing.TB, addr, id string, clean bool, mod func(*paho.ClientOptions)) paho.Client {
	t.Helper()
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetCleanSession(clean).
		SetConnectTimeout(5 * time.Second).SetAutoReconnect(true).SetConnectRetry(true).SetConnectRetryInterval(100 * time.Millisecond).
		SetMaxReconnectInterval(200 * time.Millisecond)
	if mod != nil {
		mod(o)
	}
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connecting to %s: %v", addr, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(50) })
	return c
}

func payload(patient string, seq int, n int) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, `{"patient":%q,"samples":[`, patient)
	t0 := time.Now().Add(-time.Minute).UnixMilli()
	for i := 0; i < n; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"metric":"heart_rate","value":%d,"time_ms":%d,"seq":%d}`, 60+(seq+i)%40, t0+int64(seq*n+i), seq*n+i)
	}
	b.WriteString("]}")
	return []byte(b.String())
}

func batches(t *testing.T, broker, topic string) []*vigilv1.SampleBatch {
	t.Helper()
	var out []*vigilv1.SampleBatch
	for _, r := range testenv.ReadAll(t, broker, topic) {
		var b vigilv1.SampleBatch
		if err := proto.Unmarshal(r.Value, &b); err != nil {
			t.Fatal(err)
		}
		out = append(out, &b)
	}
	return out
}

func deadLetters(t *testing.T, broker, topic string) []*vigilv1.DeadLetter {
	t.Helper()
	var out []*vigilv1.DeadLetter
	for _, r := range testenv.ReadAll(t, broker, topic) {
		var d vigilv1.DeadLetter
		if err := proto.Unmarshal(r.Value, &d); err != nil {
			t.Fatal(err)
		}
		out = append(out, &d)
	}
	return out
}

// QoS 0 and QoS 1 publishes over a real MQTT connection land on the samples
// topic with tenant and device from the topic and source mqtt; bad payloads
// land in dead letters with their reason.
func TestPublishLandsInKafka(t *testing.T) {
	broker := testenv.Kafka(t)
	e := start(t, testConfig(t, broker), true)
	c := connect(t, e.svc.Addr(), "wearable-1", true, nil)

	tok := c.Publish("vigil/st-mary/watch-7/samples", 1, false, payload("p-1", 1, 3))
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("qos 1 publish: %v", tok.Error())
	}
	// The PUBACK means Kafka has it: read at once, no waiting.
	bs := batches(t, broker, e.cfg.Kafka.Topics.Samples)
	if len(bs) != 1 || len(bs[0].Samples) != 3 || bs[0].Tenant != "st-mary" || bs[0].Device != "watch-7" ||
		bs[0].Patient != "p-1" || bs[0].Source != vigilv1.Source_SOURCE_MQTT {
		t.Fatalf("after PUBACK, samples topic holds %v", bs)
	}

	c.Publish("vigil/st-mary/watch-8/samples", 0, false, payload("p-2", 2, 2)).Wait()
	waitFor(t, func() bool { return len(batches(t, broker, e.cfg.Kafka.Topics.Samples)) == 2 })
	for _, b := range batches(t, broker, e.cfg.Kafka.Topics.Samples) {
		if b.Device == "watch-8" && (len(b.Samples) != 2 || b.Patient != "p-2") {
			t.Fatalf("qos 0 batch: %v", b)
		}
	}

	// Refusals: invalid JSON, a foreign tenant, a bad topic; all acked
	// (MQTT 3.1.1), all dead-lettered with a reason.
	for _, p := range []struct{ topic, body string }{
		{"vigil/st-mary/watch-7/samples", `{"samples":[{"metric":"heart_rate",`},
		{"vigil/st-mary/watch-7/samples", `{"tenant":"other","patient":"p","samples":[{"metric":"heart_rate","value":70,"time_ms":1}]}`},
		{"vigil/st-mary/samples", `{}`},
	} {
		if tok := c.Publish(p.topic, 1, false, p.body); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %s: %v", p.body, tok.Error())
		}
	}
	dls := deadLetters(t, broker, e.cfg.Kafka.Topics.DeadLetter)
	if len(dls) != 3 {
		t.Fatalf("want 3 dead letters, got %d: %v", len(dls), dls)
	}
	want := []struct{ reason, field, msg string }{
		{"invalid_json", "samples[0]", "unexpected end of input"},
		{"invalid_id", "tenant", `tenant "other" is not the tenant "st-mary"`},
		{"unsupported_message", "topic", "is not vigil/<tenant>/<device>/samples"},
	}
	for i, w := range want {
		d := dls[i]
		if d.Reason != w.reason || d.Field != w.field || !strings.Contains(d.Message, w.msg) || d.Source != vigilv1.Source_SOURCE_MQTT || len(d.Raw) == 0 {
			t.Errorf("dead letter %d = %s %q %q source %v raw %q; want %s %q %q", i, d.Reason, d.Field, d.Message, d.Source, d.Raw, w.reason, w.field, w.msg)
		}
	}
	if n := testutil.ToFloat64(e.svc.in.m.outcome.WithLabelValues("embedded", "1", "refused")); n != 3 {
		t.Errorf("refused qos 1 counted %v, want 3", n)
	}
	if n := testutil.ToFloat64(e.svc.in.m.outcome.WithLabelValues("embedded", "0", "accepted")); n != 1 {
		t.Errorf("accepted qos 0 counted %v, want 1", n)
	}
}

// proxy forwards TCP connections to target while up; while down it refuses
// them (accepts and closes at once) and cuts the open ones.
type proxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	up     bool
	conns  []net.Conn
}

func newProxy(t *testing.T, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target}
	t.Cleanup(func() { ln.Close(); p.set(false) })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			up := p.up
			p.mu.Unlock()
			if !up {
				c.Close()
				continue
			}
			b, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, b)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(b, c); b.Close() }()
			go func() { _, _ = io.Copy(c, b); c.Close() }()
		}
	}()
	return p
}

func (p *proxy) set(up bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.up = up
	if !up {
		for _, c := range p.conns {
			c.Close()
		}
		p.conns = nil
	}
}

// While Kafka is unreachable a QoS 1 publish gets no PUBACK: the broker
// closes the connection instead (MQTT 5: DISCONNECT 0x89 server busy), so the
// client keeps the message; once Kafka is back, the re-sent message is
// acknowledged and in Kafka.
func TestNoPubackWhileKafkaDown(t *testing.T) {
	for _, ver := range []byte{4, 5} {
		t.Run(fmt.Sprintf("mqtt-v%d", ver), func(t *testing.T) {
			broker := testenv.Kafka(t)
			cfg := testConfig(t, broker)
			// The publisher's only seed is the proxy: while it is down
			// the publisher cannot learn about any broker.
			px := newProxy(t, broker)
			cfg.Kafka.Brokers = []string{px.ln.Addr().String()}
			cfg.Kafka.ProduceTimeout = time.Second
			e := start(t, cfg, false)
			topic, body := "vigil/st-mary/watch-9/samples", payload("p-9", 1, 2)

			c := dialRaw(t, e.svc.Addr(), "wearable-down", ver, false)
			c.publish(topic, 7, false, body)
			pk, err := c.read(5 * time.Second)
			switch {
			case err == nil && pk.FixedHeader.Type == packets.Puback:
				t.Fatalf("PUBACK (reason %#x) while Kafka is unreachable", pk.ReasonCode)
			case ver == 5 && (err != nil || pk.FixedHeader.Type != packets.Disconnect || pk.ReasonCode != packets.ErrServerBusy.Code):
				t.Fatalf("want DISCONNECT server busy, got %+v, %v", pk.FixedHeader, err)
			case ver == 4 && err != io.EOF:
				t.Fatalf("want the connection closed without PUBACK, got %+v, %v", pk.FixedHeader, err)
			}
			if n := testutil.ToFloat64(e.svc.in.m.dropped.WithLabelValues("embedded", "kafka")); n != 1 {
				t.Fatalf("unacknowledged publishes counted %v, want 1", n)
			}
			if bs := batches(t, broker, cfg.Kafka.Topics.Samples); len(bs) != 0 {
				t.Fatalf("samples in Kafka while unreachable: %v", bs)
			}

			// Kafka is back. The client does what its session makes it do:
			// reconnect and send the unacknowledged message again, until
			// it is acknowledged. The publisher may need a few attempts to
			// reconnect to Kafka; each attempt ends either in a PUBACK or
			// in a disconnect without one, never in anything else.
			px.set(true)
			deadline := time.Now().Add(60 * time.Second)
			attempts := 1
			for {
				if time.Now().After(deadline) {
					t.Fatalf("no PUBACK within 60s of Kafka being back (%d attempts)", attempts)
				}
				attempts++
				c = dialRaw(t, e.svc.Addr(), "wearable-down", ver, false)
				c.publish(topic, 7, true, body) // the re-send, as the client's session does
				pk, err = c.read(30 * time.Second)
				if err == nil && pk.FixedHeader.Type == packets.Puback {
					if pk.PacketID != 7 || pk.ReasonCode != 0 {
						t.Fatalf("want PUBACK 7 success, got id %d reason %#x", pk.PacketID, pk.ReasonCode)
					}
					break
				}
				if !(ver == 5 && err == nil && pk.FixedHeader.Type == packets.Disconnect && pk.ReasonCode == packets.ErrServerBusy.Code) &&
					!(ver == 4 && err == io.EOF) {
					t.Fatalf("attempt %d: want PUBACK or a disconnect, got %+v reason %#x, %v", attempts, pk.FixedHeader, pk.ReasonCode, err)
				}
				c.conn.Close()
				time.Sleep(200 * time.Millisecond)
			}
			if n := testutil.ToFloat64(e.svc.in.m.dropped.WithLabelValues("embedded", "kafka")); n != float64(attempts-1) {
				t.Errorf("unacknowledged publishes counted %v, want %d", n, attempts-1)
			}
			// The PUBACK means Kafka has it. An attempt that timed out
			// while its produce was in flight may have landed as well: the
			// same samples again, which the ClickHouse samples table
			// collapses (ReplacingMergeTree on the sample identity).
			bs := batches(t, broker, cfg.Kafka.Topics.Samples)
			if len(bs) == 0 {
				t.Fatal("PUBACK but no samples in Kafka")
			}
			for _, b := range bs {
				if b.Patient != "p-9" || len(b.Samples) != 2 || b.Samples[0].Sequence != bs[0].Samples[0].Sequence {
					t.Fatalf("after PUBACK, samples topic holds %v", bs)
				}
			}
			t.Logf("acknowledged after %d attempts; %d batch(es) in Kafka", attempts, len(bs))
		})
	}
}

// MQTT 5 clients learn of a refusal from the PUBACK reason code: 0x99
// payload format invalid (with the reason string), 0x90 for a bad topic;
// MQTT 3.1.1 clients get a plain PUBACK (the message is dead-lettered).
func TestRefusalReasonCodes(t *testing.T) {
	broker := testenv.Kafka(t)
	e := start(t, testConfig(t, broker), false)
	for _, tc := range []struct {
		ver          byte
		topic, body  string
		code         byte
		reasonSubstr string
	}{
		{5, "vigil/st-mary/w1/samples", `{"patient":"p","samples":[{"metric":"heart_rate","value":900,"time_ms":1795428000250}]}`, 0x99, "out_of_range"},
		{5, "vigil/st-mary/w1/samples", `not json`, 0x99, "invalid JSON"},
		{5, "vigil/st-mary/w1/other", `{}`, 0x90, "is not vigil/<tenant>/<device>/samples"},
		{5, "vigil/st-mary/w1/samples", string(payload("p", 1, 1)), 0x00, ""},
		{4, "vigil/st-mary/w1/samples", `not json`, 0x00, ""},
	} {
		c := dialRaw(t, e.svc.Addr(), "refusal", tc.ver, true)
		c.publish(tc.topic, 1, false, []byte(tc.body))
		pk, err := c.read(10 * time.Second)
		if err != nil || pk.FixedHeader.Type != packets.Puback || pk.ReasonCode != tc.code || !strings.Contains(pk.Properties.ReasonString, tc.reasonSubstr) {
			t.Errorf("v%d %s %s: got %+v reason %#x %q, %v; want PUBACK %#x with %q", tc.ver, tc.topic, tc.body, pk.FixedHeader, pk.ReasonCode, pk.Properties.ReasonString, err, tc.code, tc.reasonSubstr)
		}
		c.conn.Close()
	}
	if dls := deadLetters(t, broker, e.cfg.Kafka.Topics.DeadLetter); len(dls) != 4 {
		t.Errorf("want 4 dead letters, got %d", len(dls))
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for i := 0; !cond(); i++ {
		if i > 200 {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A device may send several QoS 1 messages without waiting for each
// PUBACK (up to the receive maximum): they are acknowledged in the order
// sent, each only once Kafka has it, and their samples are on the
// partition in the order sent.
func TestPipelinedPublishesInOrder(t *testing.T) {
	broker := testenv.Kafka(t)
	e := start(t, testConfig(t, broker), false)
	c := dialRaw(t, e.svc.Addr(), "pipeliner", 4, true)
	const n = 40
	var all []byte
	for i := 1; i <= n; i++ {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 4,
			TopicName: "vigil/st-mary/watch-p/samples", PacketID: uint16(i), Payload: payload("p-pipe", i, 2)}
		var buf bytes.Buffer
		if err := pk.PublishEncode(&buf); err != nil {
			t.Fatal(err)
		}
		all = append(all, buf.Bytes()...)
	}
	if _, err := c.conn.Write(all); err != nil { // one write: n messages in flight
		t.Fatal(err)
	}
	for i := 1; i <= n; i++ {
		pk, err := c.read(10 * time.Second)
		if err != nil || pk.FixedHeader.Type != packets.Puback || pk.PacketID != uint16(i) {
			t.Fatalf("PUBACK %d: got %+v id %d, %v", i, pk.FixedHeader, pk.PacketID, err)
		}
	}
	// Every PUBACK arrived: all samples are in Kafka, in the order sent.
	var seqs []uint64
	for _, b := range batches(t, broker, e.cfg.Kafka.Topics.Samples) {
		for _, s := range b.Samples {
			seqs = append(seqs, s.Sequence)
		}
	}
	if len(seqs) != 2*n {
		t.Fatalf("%d samples in Kafka, want %d", len(seqs), 2*n)
	}
	for i := 1; i < len(seqs); i++ {
		if seqs[i] <= seqs[i-1] {
			t.Fatalf("samples out of order on the partition: %v", seqs)
		}
	}
}
