package mqtt

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/vigilhealth/vigil/internal/testenv"
)

// BenchmarkMQTTIngest publishes QoS 1 messages of 3 samples each from 64
// concurrent MQTT clients (paho, real TCP) through the embedded broker into
// a kfake broker in the same process; every message counts only once its
// PUBACK arrived (so once Kafka has it). Reports msgs/s and samples/s.
func BenchmarkMQTTIngest(b *testing.B) {
	const clients, perMsg = 256, 3
	broker := testenv.Kafka(b)
	cfg := testConfig(b, broker)
	e := start(b, cfg, false)
	cs := make([]paho.Client, clients)
	for i := range cs {
		cs[i] = connect(b, e.svc.Addr(), fmt.Sprintf("bench-%d", i), true, func(o *paho.ClientOptions) {
			o.SetMaxResumePubInFlight(1).SetWriteTimeout(10 * time.Second)
		})
	}
	// Pre-built payloads: one patient per client, realistic small bodies.
	payloads := make([][]byte, clients)
	for i := range payloads {
		payloads[i] = payload(fmt.Sprintf("bench-p%d", i), i, perMsg)
	}
	b.SetBytes(int64(len(payloads[0])))
	var next, failed atomic.Int64
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for i, c := range cs {
		wg.Add(1)
		go func(i int, c paho.Client) {
			defer wg.Done()
			topic := fmt.Sprintf("vigil/bench/watch-%d/samples", i)
			// A wearable waits for each PUBACK before the next message
			// (paho: one token at a time), so throughput comes from
			// concurrent clients, as in a ward.
			for next.Add(1) <= int64(b.N) {
				tok := c.Publish(topic, 1, false, payloads[i])
				if !tok.WaitTimeout(30*time.Second) || tok.Error() != nil {
					failed.Add(1)
				}
			}
		}(i, c)
	}
	wg.Wait()
	el := time.Since(start)
	b.StopTimer()
	if n := failed.Load(); n > 0 {
		b.Fatalf("%d publishes not acknowledged", n)
	}
	b.ReportMetric(float64(b.N)/el.Seconds(), "msgs/s")
	b.ReportMetric(float64(b.N*perMsg)/el.Seconds(), "samples/s")
}
