package main

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/vigilhealth/vigil/internal/config"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

// TestMQTTExactlyOnceAcrossRestart is the wearable's view of `vigil run`: a
// paho client with a persistent session publishes QoS 1 messages (several
// in flight) to the
// embedded broker while `vigil run` is stopped (SIGTERM) and started again
// in the middle of the stream. The client keeps what was not acknowledged
// and sends it again once it reconnects; every sample must then be in
// ClickHouse exactly once (samples FINAL: a re-sent message whose PUBACK was
// lost is collapsed by the table's identity), none lost.
func TestMQTTExactlyOnceAcrossRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the whole platform twice (~1 min)")
	}
	dataDir := t.TempDir()
	kafkaPort, chTCP, chHTTP, httpPort, mqttPort := freePort(t), freePort(t), freePort(t), freePort(t), freePort(t)
	mqttAddr := fmt.Sprintf("127.0.0.1:%d", mqttPort)
	args := []string{"run", "--data-dir", dataDir,
		"--http", fmt.Sprintf("127.0.0.1:%d", httpPort),
		"--set", fmt.Sprintf("kafka.embedded.listen=127.0.0.1:%d", kafkaPort),
		"--set", fmt.Sprintf("clickhouse.local.tcp_port=%d", chTCP),
		"--set", fmt.Sprintf("clickhouse.local.http_port=%d", chHTTP),
		"--set", "mqtt.embedded.listen=" + mqttAddr,
		"--set", "mllp.listen=127.0.0.1:0",
		"--set", "status.interval=0s"}
	base := fmt.Sprintf("http://127.0.0.1:%d", httpPort)
	p := startVigil(t, args...)
	waitHTTP(t, base+"/readyz", p, 90*time.Second)
	if !strings.Contains(p.out.String(), "mqtt://"+mqttAddr) {
		t.Errorf("banner does not name the MQTT broker mqtt://%s", mqttAddr)
	}

	// The wearable: persistent session (clean session off, fixed client
	// id), QoS 1, reconnecting on its own; paho keeps unacknowledged
	// publishes in its store and re-sends them after a reconnect.
	var lost atomic.Int64
	o := paho.NewClientOptions().AddBroker("tcp://" + mqttAddr).SetClientID("watch-e2e-1").
		SetCleanSession(false).SetAutoReconnect(true).SetConnectRetry(true).
		SetConnectRetryInterval(200 * time.Millisecond).SetMaxReconnectInterval(500 * time.Millisecond).
		SetConnectTimeout(5 * time.Second).SetWriteTimeout(5 * time.Second).
		SetConnectionLostHandler(func(paho.Client, error) { lost.Add(1) })
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
		t.Fatalf("connecting to %s: %v", mqttAddr, tok.Error())
	}
	defer c.Disconnect(100)

	const msgs, perMsg = 300, 3
	t0 := time.Now().Add(-10 * time.Minute).UnixMilli()
	body := func(m int) []byte {
		var b strings.Builder
		b.WriteString(`{"patient":"mqtt-e2e-p1","samples":[`)
		for i := 0; i < perMsg; i++ {
			seq := m*perMsg + i + 1
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"metric":"heart_rate","value":%d,"time_ms":%d,"seq":%d}`, 60+seq%40, t0+int64(seq)*250, seq)
		}
		b.WriteString("]}")
		return []byte(b.String())
	}
	// The device's loop: five messages at a time without waiting for each
	// PUBACK (paho keeps several in flight), then their tokens. A publish
	// paho refuses at once (not connected at all) is sent again by the
	// loop; one that went out stays in paho's store until acknowledged
	// and is re-sent after a reconnect.
	const window = 5
	var sent atomic.Int64
	deviceDone := make(chan struct{})
	go func() {
		defer close(deviceDone)
		const topic = "vigil/e2e/watch-e2e-1/samples"
		for m0 := 0; m0 < msgs; m0 += window {
			toks := make([]paho.Token, 0, window)
			for m := m0; m < m0+window && m < msgs; m++ {
				toks = append(toks, c.Publish(topic, 1, false, body(m)))
			}
			for k, tok := range toks {
				for attempt := 0; !tok.WaitTimeout(120*time.Second) || tok.Error() != nil; attempt++ {
					if attempt > 600 {
						t.Errorf("message %d never published: %v", m0+k, tok.Error())
						return
					}
					time.Sleep(100 * time.Millisecond)
					tok = c.Publish(topic, 1, false, body(m0+k))
				}
				sent.Add(1)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	// Restart in the middle of the stream.
	for sent.Load() < msgs/3 {
		time.Sleep(10 * time.Millisecond)
	}
	took := p.stop(t, 30*time.Second)
	t.Logf("vigil run stopped in %s after SIGTERM, after %d of %d messages", took.Round(time.Millisecond), sent.Load(), msgs)
	p = startVigil(t, args...)
	waitHTTP(t, base+"/readyz", p, 90*time.Second)
	select {
	case <-deviceDone:
	case <-time.After(3 * time.Minute):
		t.Fatalf("the device sent only %d of %d messages", sent.Load(), msgs)
	}
	if t.Failed() {
		t.FailNow()
	}
	if lost.Load() == 0 {
		t.Fatal("the client never lost its connection: the restart did not happen mid-stream")
	}
	t.Logf("client lost its connection %d time(s)", lost.Load())

	chCfg := config.Default().ClickHouse
	chCfg.Addr = fmt.Sprintf("127.0.0.1:%d", chTCP)
	conn, err := chsink.Open(context.Background(), chCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const want = msgs * perMsg
	got := waitCount(t, conn, "SELECT count() FROM samples FINAL WHERE tenant = 'e2e' AND patient = 'mqtt-e2e-p1'", want, 90*time.Second)
	if got != want {
		t.Fatalf("samples FINAL holds %d of the %d published samples", got, want)
	}
	seen := countsBy[uint64](t, conn, "SELECT sequence, count() FROM samples FINAL WHERE tenant = 'e2e' AND patient = 'mqtt-e2e-p1' GROUP BY sequence")
	for s := uint64(1); s <= want; s++ {
		if seen[s] != 1 {
			t.Errorf("sample seq %d is in ClickHouse %d times, want once", s, seen[s])
		}
	}
	var raw uint64
	if err := conn.QueryRow(context.Background(), "SELECT count() FROM samples WHERE tenant = 'e2e' AND patient = 'mqtt-e2e-p1'").Scan(&raw); err != nil {
		t.Fatal(err)
	}
	var source string
	if err := conn.QueryRow(context.Background(), "SELECT any(toString(source)) FROM samples WHERE tenant = 'e2e'").Scan(&source); err != nil {
		t.Fatal(err)
	}
	if source != "mqtt" {
		t.Errorf("source of the samples is %q, want mqtt", source)
	}
	t.Logf("%d samples exactly once (FINAL); %d rows before merges (re-sent messages whose PUBACK was lost)", want, raw)
}
