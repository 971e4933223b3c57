package mqtt

import (
	"bytes"
	"runtime"
	"strings"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/vigilhealth/vigil/ingest/httpjson"
)

// The embedded broker's ingest pipeline. OnPublish runs on the client's
// read goroutine (one per connection, mochi's): it decodes and validates the
// payload there (so decoding runs on as many goroutines as there are busy
// clients, and a client over its rate limit waits on its own goroutine) and
// queues the message on the client's lane. A lane is a goroutine shared by
// many clients: it takes what is queued (up to maxBatch messages, of any of
// its clients), publishes their dead letters and samples in one Kafka call
// each (httpjson.Handler.Commit), then writes each client's PUBACKs in one
// write. A device that waits for each PUBACK therefore shares its Kafka
// round trip, promise and goroutine wake-ups with every device that
// published meanwhile, instead of paying them per message; while a lane
// waits for Kafka, its queue fills and the next batch is larger (no timer).
//
// A client is bound to one lane for its life and a lane publishes one batch
// at a time, so one client's messages reach Kafka and are acknowledged in
// the order they were read (MQTT 4.6), pipelined or not.
const (
	// laneQueue bounds the messages read and decoded but not yet taken by
	// their lane; when it is full the read loops of the lane's clients
	// wait, which stops reading their sockets (backpressure).
	laneQueue = 1024
	// maxQueuedBytes bounds the payloads read but not yet answered, over
	// all lanes (Service.queued; a payload's decoded samples alias it and
	// are of the same order): a read loop waits for room, which stops
	// reading its socket, so memory stays bounded whatever the number of
	// clients and lanes.
	maxQueuedBytes = 32 << 20
	// maxBatch bounds the messages one lane publishes in one Kafka call.
	maxBatch = 512
	// ackWriteTimeout bounds writing one client's PUBACKs: a client that
	// does not read its socket would otherwise hold its lane (and every
	// other client of it); it is disconnected instead and sends again what
	// it did not see acknowledged.
	ackWriteTimeout = 2 * time.Second
)

// laneCount is the number of lanes: a few per core, so that a lane waiting
// for Kafka leaves others collecting and publishing.
func laneCount() int { return min(max(4, 4*runtime.GOMAXPROCS(0)), 64) }

// lane is one publishing goroutine and its queue. Everything but q is
// owned by the lane's goroutine.
type lane struct {
	q chan job

	batch   []job
	ps      []httpjson.Pending
	at      []int // ps[k] is batch[at[k]]
	outs    []httpjson.Outcome
	touched []*clientState // clients with PUBACKs to write (or to close) after this batch
}

// clientState is what the hook keeps per client that published to an
// ingest topic, from its first such publish to its disconnection.
type clientState struct {
	cl   *mochi.Client
	lane *lane

	// topic and origin cache the dead-letter origin of the client's last
	// topic (read goroutine only): a device publishes to one topic, and
	// building the string per message showed in profiles.
	topic, origin string

	// Owned by the lane's goroutine. acks are the PUBACKs encoded in this
	// batch; broken is set once a Kafka failure left a message
	// unacknowledged (the connection is then closed, and nothing the
	// client sent after it is acknowledged); hangUp closes the connection
	// once acks are written.
	acks           []byte
	touched        bool
	broken, hangUp bool
}

// job is one ingest PUBLISH on its way through a lane.
type job struct {
	st *clientState
	// pend is the decoded payload, unless decided: then r is already the
	// verdict (refused before decoding: bad topic, too large).
	pend    httpjson.Pending
	r       result
	decided bool
	qos     byte
	id      uint16
	topic   string
	start   time.Time
	weight  int64 // of Service.queued, held until the lane is done with it
	// Set by the lane: gone (not processed: the client went away first),
	// acked (a PUBACK was written).
	gone, acked bool
}

// startLanes starts the lanes; they end when the service closes
// (workersDone).
func (h *hook) startLanes() {
	s := h.s
	s.lanes = make([]*lane, laneCount())
	for i := range s.lanes {
		l := &lane{q: make(chan job, laneQueue)}
		s.lanes[i] = l
		go h.runLane(l)
	}
}

// state returns the client's state, binding it to a lane on first use. It
// runs on the client's read goroutine.
func (h *hook) state(cl *mochi.Client) *clientState {
	if v, ok := h.s.clients.Load(cl); ok {
		return v.(*clientState)
	}
	st := &clientState{cl: cl, lane: h.s.lanes[int(h.s.nextLane.Add(1))%len(h.s.lanes)]}
	h.s.clients.Store(cl, st)
	return st
}

// OnDisconnect forgets the client (it runs on the client's read goroutine
// after its last OnPublish); what it left queued is dropped unacknowledged
// by its lane.
func (h *hook) OnDisconnect(cl *mochi.Client, _ error, _ bool) {
	h.s.clients.Delete(cl)
}

// OnPublish takes a PUBLISH to vigil/...: it decodes and validates it on
// the client's read goroutine (waiting there while the device is over its
// rate limit) and queues it on the client's lane, which acknowledges it once
// Kafka has the samples; see the package documentation for the answers.
// The read loop goes on reading, so a client may pipeline; its lane keeps
// the order. Ingest messages are not relayed to MQTT subscribers (they are
// on vigil.samples.v1; relaying would also show every patient's data to any
// client allowed to subscribe). Other topics are ordinary MQTT traffic.
func (h *hook) OnPublish(cl *mochi.Client, pk packets.Packet) (packets.Packet, error) {
	s := h.s
	if cl.Net.Inline || (pk.TopicName != TopicRoot && !strings.HasPrefix(pk.TopicName, TopicRoot+"/")) {
		return pk, nil
	}
	qos := pk.FixedHeader.Qos
	if qos > 0 && s.closing.Load() {
		// Stopping: not taken, not acknowledged; the client sends it
		// again to the next broker (or to us after a restart).
		s.in.m.dropped.WithLabelValues("embedded", "stopping").Inc()
		h.disconnect(cl, packets.ErrServerShuttingDown)
		return pk, packets.ErrRejectPacket
	}
	st := h.state(cl)
	if st.topic != pk.TopicName {
		st.topic, st.origin = pk.TopicName, "mqtt://"+cl.ID+"@"+cl.Net.Remote+"/"+clipTopic(pk.TopicName)
	}
	s.inflight.add()
	in := s.in
	in.m.recv[modeEmbedded][min(qos, 2)].Inc()
	j := job{st: st, qos: qos, id: pk.PacketID, topic: pk.TopicName, start: time.Now(),
		weight: min(int64(len(pk.Payload))+1, maxQueuedBytes)}
	if err := s.queued.Acquire(s.base, j.weight); err != nil {
		// Closed while waiting for room: not taken, not acknowledged.
		in.m.dropped.WithLabelValues("embedded", "stopping").Inc()
		s.inflight.done()
		return pk, packets.ErrRejectPacket
	}
	if meta, r, ok := in.check(s.base, pk.TopicName, pk.Payload, st.origin, TopicRoot); ok {
		// pk.Payload is this packet's own buffer (mochi allocates one per
		// packet), so it may outlive OnPublish in j.pend.
		j.pend = in.core.Prepare(s.base, pk.Payload, meta)
	} else {
		j.r, j.decided = r, true
	}
	select {
	case st.lane.q <- j:
	case <-s.workersDone:
		in.core.Release(&j.pend)
		s.queued.Release(j.weight)
		s.inflight.done()
	}
	// mochi neither acknowledges nor relays it: the lane acknowledges.
	return pk, packets.ErrRejectPacket
}

// runLane publishes its clients' messages batch by batch until the service
// closes.
func (h *hook) runLane(l *lane) {
	done := h.s.workersDone
	for {
		select {
		case j := <-l.q:
			l.batch = append(l.batch[:0], j)
		case <-done:
			return
		}
	more:
		for len(l.batch) < maxBatch {
			select {
			case j := <-l.q:
				l.batch = append(l.batch, j)
			default:
				break more
			}
		}
		h.commit(l)
	}
}

// commit publishes l.batch to Kafka in one call, then writes the PUBACKs
// of each client in one write, in order, by verdict.
func (h *hook) commit(l *lane) {
	s, in := h.s, h.s.in
	batch := l.batch
	l.ps, l.at = l.ps[:0], l.at[:0]
	for i := range batch {
		j := &batch[i]
		if j.st.broken || j.st.cl.Closed() {
			// Gone (or disconnected for an earlier failure) before we
			// got to it: not acknowledged, so the client sends it again.
			in.core.Release(&j.pend)
			j.gone = true
			if j.qos > 0 {
				in.m.dropped.WithLabelValues("embedded", "disconnected").Inc()
			}
			continue
		}
		if !j.decided {
			l.ps = append(l.ps, j.pend)
			l.at = append(l.at, i)
		}
	}
	if len(l.ps) > 0 {
		l.outs = in.core.Commit(s.base, l.ps, l.outs[:0])
		for k, o := range l.outs {
			j := &batch[l.at[k]]
			j.r, j.decided = verdictOf(o), true
		}
		clear(l.ps)
		clear(l.outs)
	}
	for i := range batch {
		if j := &batch[i]; !j.gone {
			in.m.out[modeEmbedded][min(j.qos, 2)][j.r.verdict].Inc()
			h.answer(l, j)
		}
	}
	now := time.Now()
	for _, st := range l.touched {
		if len(st.acks) > 0 {
			h.writeAcks(st, now)
		}
		if st.hangUp {
			h.disconnect(st.cl, packets.ErrServerBusy)
		}
		st.acks, st.touched, st.hangUp = st.acks[:0], false, false
	}
	clear(l.touched)
	l.touched = l.touched[:0]
	for i := range batch {
		if batch[i].acked {
			in.m.ackLat[modeEmbedded].Observe(now.Sub(batch[i].start).Seconds())
		}
		s.queued.Release(batch[i].weight)
		s.inflight.done()
	}
	clear(batch)
}

// answer encodes the PUBACK of j (by its verdict) onto its client's acks;
// on a Kafka failure it marks the client broken instead: its connection is
// closed after the acks before it are written, and nothing after it is
// acknowledged (MQTT has no other way to ask for a re-send).
func (h *hook) answer(l *lane, j *job) {
	s, st, r := h.s, j.st, j.r
	cl := st.cl
	if st.broken {
		// An earlier message of this client in this batch failed.
		if j.qos > 0 {
			s.in.m.dropped.WithLabelValues("embedded", "kafka").Inc()
		}
		return
	}
	if j.qos == 0 {
		if r.verdict == failed {
			s.deps.Log.Warn("mqtt qos 0 message lost: kafka did not acknowledge", "client", cl.ID, "topic", j.topic, "err", r.reason)
		}
		return
	}
	v5 := cl.Properties.ProtocolVersion == 5
	var code packets.Code
	switch {
	case r.verdict == refused && v5:
		code = packets.Code{Code: r.code, Reason: clipReason(r.reason)}
	case r.verdict == failed && v5 && !r.retriable:
		code = packets.Code{Code: 0x80, Reason: clipReason(r.reason)}
	case r.verdict == failed:
		// No PUBACK: close the connection so that the client sends it
		// (and what follows it) again once it reconnects.
		st.broken, st.hangUp = true, true
		l.touch(st)
		s.in.m.dropped.WithLabelValues("embedded", "kafka").Inc()
		s.deps.Log.Warn("mqtt publish not acknowledged: kafka unavailable; disconnecting the client so it re-sends", "client", cl.ID, "err", r.reason)
		return
	}
	j.acked = true
	l.touch(st)
	if !v5 {
		// MQTT 3.1.1 PUBACK (§3.4): fixed header, remaining length 2,
		// packet id. Encoded here because mochi's PubackEncode allocates
		// several buffers per packet. MQTT 3.1.1 has no negative PUBACK:
		// a refused message will never succeed and is on the dead-letter
		// topic, so it is acknowledged.
		st.acks = append(st.acks, packets.Puback<<4, 2, byte(j.id>>8), byte(j.id))
		return
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: j.id, ReasonCode: code.Code,
		ProtocolVersion: 5}
	if code.Code >= packets.ErrUnspecifiedError.Code {
		pk.Properties.ReasonString = code.Reason
	}
	// [MQTT-3.1.2-29]: no reason string when the client asked for no
	// problem information.
	pk.Mods.DisallowProblemInfo = cl.Properties.Props.RequestProblemInfoFlag && cl.Properties.Props.RequestProblemInfo == 0
	pk.Mods.MaxSize = cl.Properties.Props.MaximumPacketSize
	var buf bytes.Buffer
	_ = pk.PubackEncode(&buf)
	st.acks = append(st.acks, buf.Bytes()...)
}

// touch lists st among the clients to answer after this batch.
func (l *lane) touch(st *clientState) {
	if !st.touched {
		st.touched = true
		l.touched = append(l.touched, st)
	}
}

// writeAcks writes st's PUBACKs in one write under mochi's write lock of
// the connection (see Client.WritePacket), within ackWriteTimeout; a
// failed or partial write closes the connection (the client re-sends what
// it did not see acknowledged).
func (h *hook) writeAcks(st *clientState, now time.Time) {
	cl := st.cl
	cl.Lock()
	conn := cl.Net.Conn
	_ = conn.SetWriteDeadline(now.Add(ackWriteTimeout))
	_, err := conn.Write(st.acks)
	_ = conn.SetWriteDeadline(time.Time{})
	cl.Unlock()
	if err != nil {
		h.s.deps.Log.Debug("mqtt writing PUBACKs failed; closing the connection (the client will re-send)", "client", cl.ID, "err", err)
		cl.Stop(err)
	}
}
