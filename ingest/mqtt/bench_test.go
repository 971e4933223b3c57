package mqtt

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/vigilhealth/vigil/internal/testenv"
)

// BenchmarkMQTTIngest publishes QoS 1 messages of 3 samples each from many
// concurrent MQTT 3.1.1 connections (one per wearable, real TCP) through the
// embedded broker into a kfake broker in the same process. Each wearable
// waits for the PUBACK of a message (so for Kafka to have it) before it
// sends the next, as a device with one message in flight does; throughput
// comes from the number of devices, as in a ward. The devices are minimal
// clients writing pre-encoded PUBLISH packets and reading PUBACKs (a
// library client such as paho costs as much CPU as the broker itself, and
// on a real site that CPU is the wearables', not Vigil's). Reports msgs/s
// samples/s and the CPU per message.
func BenchmarkMQTTIngest(b *testing.B) {
	for _, c := range []struct{ devices, window int }{{256, 1}, {1024, 1}, {256, 16}} {
		b.Run(fmt.Sprintf("devices=%d/inflight=%d", c.devices, c.window), func(b *testing.B) { benchIngest(b, c.devices, c.window) })
	}
}

// benchIngest: window is how many messages a device sends at once before
// it waits for their PUBACKs (1: a device that waits for each; more: a
// device sending its backlog, as MQTT's receive maximum allows).
func benchIngest(b *testing.B, clients, window int) {
	const perMsg = 3
	broker := testenv.Kafka(b)
	cfg := testConfig(b, broker)
	e := start(b, cfg, false)
	devs := make([]*benchDevice, clients)
	for i := range devs {
		devs[i] = dialBenchDevice(b, e.svc.Addr(), i)
	}
	b.SetBytes(int64(len(devs[0].message(perMsg, 1))))
	devs[0].seq = 0
	var next atomic.Int64
	var failed atomic.Value
	b.ResetTimer()
	cpu0 := cpuTime()
	start := time.Now()
	var wg sync.WaitGroup
	for _, d := range devs {
		wg.Add(1)
		go func(d *benchDevice) {
			defer wg.Done()
			for next.Add(int64(window)) <= int64(b.N)+int64(window)-1 {
				if err := d.roundTrip(perMsg, window); err != nil {
					failed.Store(err)
					return
				}
			}
		}(d)
	}
	wg.Wait()
	el := time.Since(start)
	cpu := cpuTime() - cpu0
	b.StopTimer()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatalf("publish not acknowledged: %v", err)
	}
	b.ReportMetric(float64(b.N)/el.Seconds(), "msgs/s")
	b.ReportMetric(float64(b.N*perMsg)/el.Seconds(), "samples/s")
	// CPU per message of this whole process (broker, ingest, kfake and the
	// devices): msgs/s is bounded by cores / this, which tells what a
	// shared, loaded machine hides.
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/msg")
}

// cpuTime is the user+system CPU time this process used so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchDevice is one wearable's MQTT 3.1.1 connection. Each message has
// new sequence numbers and times (the ingest de-duplicates re-sent
// sequences, which would skip Kafka); packet id 1, one message in flight at
// a time.
type benchDevice struct {
	conn    net.Conn
	rd      *bufio.Reader
	head    []byte // fixed header is written per message; this is topic + packet id
	patient string
	seq     int
	t0      int64
	body    []byte
	pkt     []byte
	ack     [4]byte
}

func dialBenchDevice(b *testing.B, addr string, i int) *benchDevice {
	b.Helper()
	c := dialRaw(b, addr, fmt.Sprintf("bench-%d", i), 4, true)
	topic := fmt.Sprintf("vigil/bench/watch-%d/samples", i)
	head := []byte{byte(len(topic) >> 8), byte(len(topic))}
	head = append(head, topic...)
	head = append(head, 0, 1) // packet id 1
	_ = c.conn.SetReadDeadline(time.Time{})
	return &benchDevice{conn: c.conn, rd: c.rd, head: head, patient: fmt.Sprintf("bench-p%d", i),
		t0: time.Now().Add(-time.Hour).UnixMilli()}
}

// message encodes the next PUBLISH (packet id id): perMsg heart-rate
// samples with new sequence numbers, the JSON of POST /v1/samples.
func (d *benchDevice) message(perMsg int, id uint16) []byte {
	d.head[len(d.head)-2], d.head[len(d.head)-1] = byte(id>>8), byte(id)
	body := append(d.body[:0], `{"patient":"`...)
	body = append(body, d.patient...)
	body = append(body, `","samples":[`...)
	for i := 0; i < perMsg; i++ {
		d.seq++
		if i > 0 {
			body = append(body, ',')
		}
		body = append(body, `{"metric":"heart_rate","value":`...)
		body = strconv.AppendInt(body, int64(60+d.seq%40), 10)
		body = append(body, `,"time_ms":`...)
		body = strconv.AppendInt(body, d.t0+int64(d.seq)*10, 10)
		body = append(body, `,"seq":`...)
		body = strconv.AppendInt(body, int64(d.seq), 10)
		body = append(body, '}')
	}
	body = append(body, "]}"...)
	d.body = body
	n := len(d.head) + len(body)
	pkt := append(d.pkt, packets.Publish<<4|1<<1) // QoS 1
	for {                                         // remaining length, variable byte integer
		e := byte(n % 128)
		n /= 128
		if n > 0 {
			e |= 128
		}
		pkt = append(pkt, e)
		if n == 0 {
			break
		}
	}
	pkt = append(pkt, d.head...)
	pkt = append(pkt, body...)
	d.pkt = pkt
	return pkt
}

// roundTrip sends the next window PUBLISH packets in one write and reads
// their PUBACKs, in order.
func (d *benchDevice) roundTrip(perMsg, window int) error {
	d.pkt = d.pkt[:0]
	for i := 1; i <= window; i++ {
		d.message(perMsg, uint16(i))
	}
	if _, err := d.conn.Write(d.pkt); err != nil {
		return err
	}
	_ = d.conn.SetReadDeadline(time.Now().Add(60 * time.Second))
	for i := 1; i <= window; i++ {
		if _, err := io.ReadFull(d.rd, d.ack[:]); err != nil {
			return fmt.Errorf("waiting for PUBACK: %w", err)
		}
		if d.ack[0] != packets.Puback<<4 || d.ack[1] != 2 || int(d.ack[2])<<8|int(d.ack[3]) != i {
			return fmt.Errorf("want PUBACK %d, got % x", i, d.ack)
		}
	}
	return nil
}
