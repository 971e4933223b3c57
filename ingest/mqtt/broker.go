package mqtt

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
)

// Option configures a Service.
type Option func(*Service)

// WithResolver makes samples that name a device but no patient take the
// patient bound to the device (ingest/binding.Store), as on HTTP; without
// it the patient is required.
func WithResolver(r httpjson.Resolver) Option { return func(s *Service) { s.resolver = r } }

// Service is the MQTT ingest stage: the embedded broker (mqtt.embedded) and
// the external subscription (mqtt.external), whichever are configured. Its
// methods are safe for concurrent use; Close is idempotent.
type Service struct {
	cfg      config.MQTT
	deps     stage.Deps
	in       *ingester
	resolver httpjson.Resolver

	srv    *mochi.Server
	tcp    *listeners.TCP
	ledger *auth.Ledger
	// closing refuses new QoS 1 publishes (the client keeps them and
	// sends them again) while the ones in flight drain.
	closing  atomic.Bool
	inflight *drainGroup
	// clients holds the state of each client that published to an ingest
	// topic (*mochi.Client → *clientState), from its first such publish to
	// its disconnection.
	clients sync.Map
	// workersDone stops the per-client workers (Close).
	workersDone chan struct{}
	// base is the context of Kafka writes: not cancelled by a stop (in
	// flight publishes finish), only when Close gives up.
	base   context.Context
	cancel context.CancelFunc

	ext *subscriber

	closeOnce sync.Once
	closeErr  error
	started   atomic.Bool
}

// New creates the MQTT ingest stage for cfg.MQTT, publishing through pub
// (which must outlive it), and registers its metrics on deps.Metrics. The
// embedded broker's listener is bound here (Addr is valid after New);
// clients are served from Run.
func New(cfg config.Config, deps stage.Deps, pub httpjson.Publisher, opts ...Option) (*Service, error) {
	deps = deps.WithDefaults()
	if pub == nil {
		return nil, errors.New("creating mqtt ingest: no publisher")
	}
	s := &Service{cfg: cfg.MQTT, deps: deps, inflight: newDrainGroup(), workersDone: make(chan struct{})}
	for _, o := range opts {
		o(s)
	}
	m, err := newMetrics(deps.Metrics)
	if err != nil {
		return nil, err
	}
	s.in, err = newIngester(cfg, deps, pub, m, s.resolver)
	if err != nil {
		return nil, err
	}
	s.base, s.cancel = context.WithCancel(context.Background())
	if cfg.MQTT.Embedded.Enabled {
		if err := s.initBroker(); err != nil {
			s.cancel()
			return nil, err
		}
	}
	if len(cfg.MQTT.External.Brokers) > 0 {
		s.ext = newSubscriber(cfg.MQTT, s.in, deps.Log.With("mqtt", "external"))
	}
	return s, nil
}

func (s *Service) initBroker() error {
	e := s.cfg.Embedded
	if e.Auth.LedgerFile != "" {
		doc, err := os.ReadFile(e.Auth.LedgerFile)
		if err != nil {
			return fmt.Errorf("reading mqtt.embedded.auth.ledger_file: %w", err)
		}
		s.ledger = new(auth.Ledger)
		if err := s.ledger.Unmarshal(doc); err != nil {
			return fmt.Errorf("parsing mqtt.embedded.auth.ledger_file %s: %w", e.Auth.LedgerFile, err)
		}
	}
	caps := mochi.NewDefaultServerCapabilities()
	// Payloads up to max_payload_bytes are read and, when over, dead
	// lettered; a packet beyond that and 64 KiB of topic and properties
	// closes the connection unread.
	caps.MaximumPacketSize = uint32(s.cfg.MaxPayloadBytes + 64<<10)
	caps.Compatibilities.NoInheritedPropertiesOnAck = true
	caps.MaximumQos = 1 // QoS 2 publishes are taken as QoS 1 (acknowledged once Kafka has them).
	s.srv = mochi.New(&mochi.Options{
		Capabilities:           caps,
		Logger:                 s.deps.Log.With("mqtt", "embedded"),
		SysTopicResendInterval: 0,
	})
	if err := s.srv.AddHook(&hook{s: s}, nil); err != nil {
		return fmt.Errorf("adding mqtt ingest hook: %w", err)
	}
	lc := listeners.Config{Type: "tcp", ID: "vigil", Address: e.Listen}
	if e.TLS.CertFile != "" {
		tc, err := tlsConfig(e.TLS)
		if err != nil {
			return err
		}
		lc.TLSConfig = tc
	}
	s.tcp = listeners.NewTCP(lc)
	if err := s.srv.AddListener(s.tcp); err != nil {
		return fmt.Errorf("mqtt listening on %s: %w", e.Listen, err)
	}
	return nil
}

func tlsConfig(c config.MQTTTLS) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("loading mqtt.embedded.tls certificate: %w", err)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if c.ClientCAFile != "" {
		pem, err := os.ReadFile(c.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("reading mqtt.embedded.tls.client_ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("mqtt.embedded.tls.client_ca_file %s: no PEM certificate", c.ClientCAFile)
		}
		tc.ClientCAs, tc.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return tc, nil
}

// Addr is the embedded broker's bound host:port ("" when it is disabled).
func (s *Service) Addr() string {
	if s.tcp == nil {
		return ""
	}
	return s.tcp.Address()
}

// Ready reports whether the stage serves: the embedded broker accepts
// connections and the external subscription (if any) is connected.
func (s *Service) Ready(context.Context) error {
	if s.closing.Load() {
		return errors.New("mqtt ingest is stopping")
	}
	if s.srv != nil && !s.started.Load() {
		return errors.New("mqtt broker not started")
	}
	if s.ext != nil && !s.ext.connected() {
		return fmt.Errorf("not connected to external mqtt broker %v", s.cfg.External.Brokers)
	}
	return nil
}

// Run serves until ctx ends, then drains: new QoS 1 publishes are no longer
// taken (the client keeps and re-sends them), publishes in flight finish
// and are acknowledged (up to mqtt.embedded.drain_timeout), then every
// connection is closed.
func (s *Service) Run(ctx context.Context) error {
	if s.srv != nil {
		if err := s.srv.Serve(); err != nil {
			return fmt.Errorf("starting mqtt broker: %w", err)
		}
		s.started.Store(true)
		s.deps.Log.Info("mqtt broker listening", "addr", s.Addr())
	}
	// The external subscription (if any) stops with ctx, leaving what it
	// did not acknowledge with its broker.
	extDone := make(chan error, 1)
	if s.ext != nil {
		go func() { extDone <- s.ext.run(ctx) }()
	} else {
		extDone <- nil
	}
	<-ctx.Done()
	dctx, cancel := context.WithTimeout(context.Background(), s.cfg.Embedded.DrainTimeout)
	defer cancel()
	s.drain(dctx)
	if err := <-extDone; err != nil {
		return fmt.Errorf("external mqtt subscription: %w", err)
	}
	return nil
}

// drain stops taking QoS 1 publishes and waits for those in flight.
func (s *Service) drain(ctx context.Context) {
	s.closing.Store(true)
	if err := s.inflight.wait(ctx); err != nil {
		s.deps.Log.Warn("mqtt drain incomplete; closing connections (clients will re-send what was not acknowledged)", "err", err)
	}
}

// Close stops serving and closes every connection (and the external
// subscription); publishes still in flight are abandoned unacknowledged,
// so their clients send them again. Idempotent.
func (s *Service) Close(ctx context.Context) error {
	s.closeOnce.Do(func() {
		s.closing.Store(true)
		if s.srv != nil {
			if err := s.inflight.wait(ctx); err != nil {
				s.deps.Log.Warn("closing mqtt broker with publishes in flight", "err", err)
			}
			s.cancel()
			close(s.workersDone)
			s.closeErr = s.srv.Close()
		}
		s.cancel()
		if s.ext != nil {
			s.ext.close()
		}
	})
	return s.closeErr
}

// hook is the mochi hook that ingests PUBLISH packets on the client's read
// goroutine: mochi writes the PUBACK of a QoS 1 PUBLISH only after OnPublish
// returns (server.go processPublish), so blocking here until Kafka
// acknowledged holds the PUBACK back, and one client's publishes are
// processed in order. Returning packets.ErrRejectPacket skips the PUBACK
// altogether; a packets.Code error sends an MQTT 5 PUBACK with that reason.
type hook struct {
	mochi.HookBase
	s *Service
}

func (h *hook) ID() string { return "vigil-ingest" }

func (h *hook) Provides(b byte) bool {
	return bytes.Contains([]byte{mochi.OnConnectAuthenticate, mochi.OnACLCheck, mochi.OnPublish, mochi.OnDisconnect}, []byte{b})
}

// Per-client pipeline bounds: a client may have up to clientQueue ingest
// publishes read but not yet acknowledged (beyond that its read loop waits,
// which stops reading its socket: backpressure); a worker takes up to
// maxBatch of them into one Kafka write.
const (
	clientQueue = 256
	maxBatch    = 64
)

// clientState is what the hook keeps per client that published to an
// ingest topic. topic and origin are used on the client's read goroutine
// only; queue carries its publishes, in order, to its worker goroutine.
type clientState struct {
	// topic and origin cache the dead-letter origin of the client's last
	// topic: a device publishes to one topic, and building the string per
	// message showed in profiles.
	topic, origin string
	queue         chan job
}

// job is one ingest PUBLISH waiting for its worker.
type job struct {
	msg   message
	id    uint16
	start time.Time
}

// state returns the client's state, starting its worker on first use. It
// runs on the client's read goroutine.
func (h *hook) state(cl *mochi.Client) *clientState {
	if v, ok := h.s.clients.Load(cl); ok {
		return v.(*clientState)
	}
	st := &clientState{queue: make(chan job, clientQueue)}
	h.s.clients.Store(cl, st)
	go h.work(cl, st.queue)
	return st
}

// OnDisconnect ends the client's worker once it has taken what was queued
// (it runs on the client's read goroutine after the last OnPublish).
func (h *hook) OnDisconnect(cl *mochi.Client, _ error, _ bool) {
	if v, ok := h.s.clients.LoadAndDelete(cl); ok {
		close(v.(*clientState).queue)
	}
}

// OnConnectAuthenticate admits anonymous clients per mqtt.embedded.auth.
// anonymous and named ones per the ledger.
func (h *hook) OnConnectAuthenticate(cl *mochi.Client, pk packets.Packet) bool {
	if len(cl.Properties.Username) == 0 {
		switch h.s.cfg.Embedded.Auth.Anonymous {
		case "allow":
			return true
		case "loopback":
			return isLoopback(cl.Net.Remote)
		}
		return false
	}
	if h.s.ledger == nil {
		return false
	}
	_, ok := h.s.ledger.AuthOk(cl, pk)
	return ok
}

// OnACLCheck applies the ledger's ACL to named users; anonymous clients may
// publish and subscribe anywhere.
func (h *hook) OnACLCheck(cl *mochi.Client, topic string, write bool) bool {
	if h.s.ledger == nil || len(cl.Properties.Username) == 0 {
		return true
	}
	_, ok := h.s.ledger.ACLOk(cl, topic, write)
	return ok
}

func isLoopback(remote string) bool {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// OnPublish takes a PUBLISH to vigil/... off the client's read loop onto
// the client's worker (see work), which acknowledges it once Kafka has the
// samples; see the package documentation for the answers. The read loop
// goes on reading, so a client may pipeline (up to clientQueue messages);
// the worker keeps their order. Ingest messages are not relayed to MQTT
// subscribers (they are on vigil.samples.v1; relaying would also show every
// patient's data to any client allowed to subscribe). Other topics are
// ordinary MQTT traffic.
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
	j := job{msg: message{topic: pk.TopicName, payload: pk.Payload, qos: qos, origin: st.origin}, id: pk.PacketID, start: time.Now()}
	select {
	case st.queue <- j:
	case <-s.workersDone:
		s.inflight.done()
	}
	// mochi neither acknowledges nor relays it: the worker acknowledges.
	return pk, packets.ErrRejectPacket
}

// work ingests a client's publishes in order: it takes what is queued (up
// to maxBatch), writes it to Kafka in one call, then writes the PUBACKs in
// one write. It ends when the client disconnects or the service closes.
func (h *hook) work(cl *mochi.Client, q chan job) {
	s := h.s
	var (
		batch   []job
		msgs    []message
		results []result
		acks    bytes.Buffer
		broken  bool // the connection was closed for a Kafka failure
	)
	for {
		select {
		case j, ok := <-q:
			if !ok {
				return
			}
			batch = append(batch[:0], j)
		case <-s.workersDone:
			return
		}
	more:
		for len(batch) < maxBatch {
			select {
			case j, ok := <-q:
				if !ok {
					break more
				}
				batch = append(batch, j)
			default:
				break more
			}
		}
		if broken || cl.Closed() {
			// Gone before we got to it: not acknowledged, so the client
			// sends it again.
			s.in.m.dropped.WithLabelValues("embedded", "disconnected").Add(float64(len(batch)))
			for range batch {
				s.inflight.done()
			}
			continue
		}
		msgs = msgs[:0]
		for _, j := range batch {
			msgs = append(msgs, j.msg)
		}
		results = s.in.handleBatch(s.base, modeEmbedded, msgs, TopicRoot, results)
		acks.Reset()
		broken = h.answer(cl, batch, results, &acks)
		if acks.Len() > 0 {
			cl.Lock() // mochi's write lock of the connection (see Client.WritePacket)
			_, err := cl.Net.Conn.Write(acks.Bytes())
			cl.Unlock()
			if err != nil {
				s.deps.Log.Debug("mqtt writing PUBACKs failed; the client will re-send", "client", cl.ID, "err", err)
			}
		}
		if broken {
			h.disconnect(cl, packets.ErrServerBusy)
		}
		now := time.Now()
		for _, j := range batch {
			if j.msg.qos > 0 && !broken {
				s.in.m.ackLat[modeEmbedded].Observe(now.Sub(j.start).Seconds())
			}
			s.inflight.done()
		}
	}
}

// answer encodes into acks the PUBACKs of batch, in order, by verdict; on a
// Kafka failure it stops there and reports true: the caller closes the
// connection after writing acks instead of acknowledging the rest (the
// client sends them again).
func (h *hook) answer(cl *mochi.Client, batch []job, results []result, acks *bytes.Buffer) (broken bool) {
	s := h.s
	v5 := cl.Properties.ProtocolVersion == 5
	for i, r := range results {
		j := batch[i]
		if r.verdict == failed && j.msg.qos == 0 {
			s.deps.Log.Warn("mqtt qos 0 message lost: kafka did not acknowledge", "client", cl.ID, "topic", j.msg.topic, "err", r.reason)
			continue
		}
		if j.msg.qos == 0 {
			continue
		}
		var code packets.Code
		switch {
		case r.verdict == refused && v5:
			code = packets.Code{Code: r.code, Reason: clipReason(r.reason)}
		case r.verdict == failed && v5 && !r.retriable:
			code = packets.Code{Code: 0x80, Reason: clipReason(r.reason)}
		case r.verdict == failed:
			// No PUBACK: close the connection so that the client sends
			// it (and what follows it) again once it reconnects (MQTT
			// has no other way to ask).
			n := 0
			for _, k := range batch[i:] {
				if k.msg.qos > 0 {
					n++
				}
			}
			s.in.m.dropped.WithLabelValues("embedded", "kafka").Add(float64(n))
			s.deps.Log.Warn("mqtt publish not acknowledged: kafka unavailable; disconnecting the client so it re-sends", "client", cl.ID, "unacknowledged", n, "err", r.reason)
			return true
		}
		// MQTT 3.1.1 has no negative PUBACK: a refused message will
		// never succeed and is on the dead-letter topic, so it is
		// acknowledged.
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: j.id, ReasonCode: code.Code,
			ProtocolVersion: cl.Properties.ProtocolVersion}
		if code.Code >= packets.ErrUnspecifiedError.Code {
			pk.Properties.ReasonString = code.Reason
		}
		// [MQTT-3.1.2-29]: no reason string when the client asked for
		// no problem information.
		pk.Mods.DisallowProblemInfo = cl.Properties.Props.RequestProblemInfoFlag && cl.Properties.Props.RequestProblemInfo == 0
		pk.Mods.MaxSize = cl.Properties.Props.MaximumPacketSize
		_ = pk.PubackEncode(acks)
	}
	return false
}

// disconnect closes a client's connection: MQTT 5 with a DISCONNECT
// carrying code, MQTT 3.1.1 (which has no server DISCONNECT) by closing.
func (h *hook) disconnect(cl *mochi.Client, code packets.Code) {
	if cl.Properties.ProtocolVersion == 5 {
		_ = h.s.srv.DisconnectClient(cl, code)
		return
	}
	cl.Stop(code)
}

// clipReason bounds an MQTT 5 reason string.
func clipReason(s string) string {
	if len(s) > 512 {
		return s[:512] + "…"
	}
	return s
}
