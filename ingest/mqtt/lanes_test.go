package mqtt

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/vigilhealth/vigil/internal/testenv"
)

// publishPacket encodes a QoS 1 PUBLISH of payload to topic.
func publishPacket(t testing.TB, topic string, id uint16, payload []byte) []byte {
	t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 4,
		TopicName: topic, PacketID: id, Payload: payload}
	var buf bytes.Buffer
	if err := pk.PublishEncode(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// readAcks reads the PUBACKs of packet ids from..to, in order.
func (c *rawClient) readAcks(from, to int, limit time.Duration) error {
	for i := from; i <= to; i++ {
		pk, err := c.read(limit)
		if err != nil {
			return fmt.Errorf("waiting for PUBACK %d: %w", i, err)
		}
		if pk.FixedHeader.Type != packets.Puback || pk.PacketID != uint16(i) {
			return fmt.Errorf("want PUBACK %d, got type %d id %d", i, pk.FixedHeader.Type, pk.PacketID)
		}
	}
	return nil
}

// Many devices publishing at once share their lanes' Kafka calls: each
// device gets its PUBACKs in order, every sample is in Kafka in each
// device's order, and there were fewer Kafka calls than messages.
func TestDevicesShareKafkaCalls(t *testing.T) {
	broker := testenv.Kafka(t)
	e := start(t, testConfig(t, broker), false)
	const devices, rounds, window = 48, 10, 3 // window > 1: some devices pipeline
	var wg sync.WaitGroup
	errs := make(chan error, devices)
	for d := range devices {
		c := dialRaw(t, e.svc.Addr(), fmt.Sprintf("dev-%d", d), 4, true)
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := fmt.Sprintf("vigil/st-mary/watch-%d/samples", d)
			w := 1 + d%window
			seq := 0
			for range rounds {
				var out []byte
				for i := 1; i <= w; i++ {
					seq++
					out = append(out, publishPacket(t, topic, uint16(i), payload(fmt.Sprintf("p-%d", d), seq, 2))...)
				}
				if _, err := c.conn.Write(out); err != nil {
					errs <- err
					return
				}
				if err := c.readAcks(1, w, 10*time.Second); err != nil {
					errs <- fmt.Errorf("device %d: %w", d, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	msgs := 0
	for d := range devices {
		msgs += rounds * (1 + d%window)
	}
	last := map[string]uint64{}
	n := 0
	for _, b := range batches(t, broker, e.cfg.Kafka.Topics.Samples) {
		for _, s := range b.Samples {
			if s.Sequence <= last[b.Device] {
				t.Fatalf("device %s: sequence %d after %d on its partition", b.Device, s.Sequence, last[b.Device])
			}
			last[b.Device] = s.Sequence
			n++
		}
	}
	if n != 2*msgs {
		t.Fatalf("%d samples in Kafka, want %d", n, 2*msgs)
	}
	h, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var published uint64
	for _, mf := range h {
		if mf.GetName() == "vigil_ingest_publish_seconds" {
			published = mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	if published == 0 || published >= uint64(msgs) {
		t.Fatalf("%d Kafka publish calls for %d messages: messages of different devices were not batched", published, msgs)
	}
	t.Logf("%d messages from %d devices in %d Kafka publish calls", msgs, devices, published)
}

// A device over its rate limit is slowed down on its own connection: a
// device sharing its lane is still acknowledged at once.
func TestRateLimitedDeviceDoesNotHoldItsLane(t *testing.T) {
	broker := testenv.Kafka(t)
	cfg := testConfig(t, broker)
	cfg.Ingest.RateLimit.SamplesPerSecond = 10
	cfg.Ingest.RateLimit.Burst = 10
	e := start(t, cfg, false)
	addr := e.svc.Addr()
	first := func(c *rawClient, topic, patient string) {
		t.Helper()
		if _, err := c.conn.Write(publishPacket(t, topic, 1, payload(patient, 0, 1))); err != nil {
			t.Fatal(err)
		}
		if err := c.readAcks(1, 1, 5*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	// Lanes are taken round robin at a client's first publish: after
	// len(lanes)-1 others, b gets a's lane.
	a := dialRaw(t, addr, "flooder", 4, true)
	first(a, "vigil/st-mary/flooder/samples", "p-a")
	for i := range len(e.svc.lanes) - 1 {
		first(dialRaw(t, addr, fmt.Sprintf("filler-%d", i), 4, true), fmt.Sprintf("vigil/st-mary/filler-%d/samples", i), "p-f")
	}
	b := dialRaw(t, addr, "neighbour", 4, true)
	first(b, "vigil/st-mary/neighbour/samples", "p-b")
	if e.svc.clientLane(t, "flooder") != e.svc.clientLane(t, "neighbour") {
		t.Fatal("test set-up: the two clients are not on the same lane")
	}

	// a sends 30 samples at once: 9 within what is left of its burst,
	// the rest at 10/s (about 2 s).
	var out []byte
	for i := 1; i <= 10; i++ {
		out = append(out, publishPacket(t, "vigil/st-mary/flooder/samples", uint16(i), payload("p-a", i, 3))...)
	}
	if _, err := a.conn.Write(out); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // a is now waiting for tokens
	start := time.Now()
	if _, err := b.conn.Write(publishPacket(t, "vigil/st-mary/neighbour/samples", 2, payload("p-b", 1, 1))); err != nil {
		t.Fatal(err)
	}
	if err := b.readAcks(2, 2, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited > time.Second {
		t.Fatalf("the neighbour's PUBACK took %v: the rate-limited device held their lane", waited)
	}
	// a was still being slowed down meanwhile (else this test shows
	// nothing), and then gets every PUBACK, in order.
	got := 0
	for ; got < 10; got++ {
		pk, err := a.read(50 * time.Millisecond)
		if err != nil {
			break
		}
		if pk.FixedHeader.Type != packets.Puback || pk.PacketID != uint16(got+1) {
			t.Fatalf("want PUBACK %d, got type %d id %d", got+1, pk.FixedHeader.Type, pk.PacketID)
		}
	}
	if got == 10 {
		t.Fatal("the flooding device was not slowed down by its rate limit")
	}
	if err := a.readAcks(got+1, 10, 10*time.Second); err != nil {
		t.Fatal(err)
	}
}

// clientLane is the index of the lane of the connected client id.
func (s *Service) clientLane(t testing.TB, id string) int {
	t.Helper()
	idx := -1
	s.clients.Range(func(k, v any) bool {
		st := v.(*clientState)
		if st.cl.ID == id {
			for i, l := range s.lanes {
				if l == st.lane {
					idx = i
				}
			}
			return false
		}
		return true
	})
	if idx < 0 {
		t.Fatalf("client %s has no lane", id)
	}
	return idx
}
