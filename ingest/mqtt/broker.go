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
	"sync"
	"sync/atomic"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/sync/semaphore"

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
	// lanes publish the ingest messages of all clients (lanes.go); a
	// client is bound to one lane (nextLane, round robin) for its life.
	lanes    []*lane
	nextLane atomic.Uint32
	// queued holds the bytes of the payloads between OnPublish and their
	// answer (maxQueuedBytes).
	queued *semaphore.Weighted
	// workersDone stops the lanes (Close).
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
	s := &Service{cfg: cfg.MQTT, deps: deps, inflight: newDrainGroup(), workersDone: make(chan struct{}),
		queued: semaphore.NewWeighted(maxQueuedBytes)}
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
	h := &hook{s: s}
	if err := s.srv.AddHook(h, nil); err != nil {
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
	h.startLanes()
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
			// mochi closes a listener's clients under Clients.GetByListener,
			// which takes the clients' read lock twice and so deadlocks
			// with a client deleting itself at that moment (seen when
			// devices hang up during a stop). Closing the listener here
			// with closeClients makes srv.Close skip that step.
			s.tcp.Close(s.closeClients)
			s.closeErr = s.srv.Close()
		}
		s.cancel()
		if s.ext != nil {
			s.ext.close()
		}
	})
	return s.closeErr
}

// closeClients disconnects the clients of listener id, listing them under
// one read lock of mochi's client map (Clients.GetAll).
func (s *Service) closeClients(id string) {
	for _, cl := range s.srv.Clients.GetAll() {
		if cl.Net.Listener == id && !cl.Closed() {
			_ = s.srv.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}
	}
}

// hook is the mochi hook that ingests PUBLISH packets: OnPublish runs on
// the client's read goroutine, decodes and validates the payload there and
// hands it to the client's lane (lanes.go), which publishes it to Kafka with
// those of other clients and then writes its PUBACK. Returning
// packets.ErrRejectPacket makes mochi neither acknowledge nor relay it.
type hook struct {
	mochi.HookBase
	s *Service
}

func (h *hook) ID() string { return "vigil-ingest" }

func (h *hook) Provides(b byte) bool {
	return bytes.Contains([]byte{mochi.OnConnectAuthenticate, mochi.OnACLCheck, mochi.OnPublish, mochi.OnDisconnect}, []byte{b})
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
