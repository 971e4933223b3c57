package mqtt

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"hash/fnv"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/vigilhealth/vigil/internal/config"
)

// Workers of the external subscription: messages are spread over them by
// topic (so one device's messages stay in order), each with a bounded queue;
// a full queue blocks paho's delivery (backpressure onto the broker, which
// stops sending once its in-flight window is full).
const (
	extWorkers   = 16
	extQueueSize = 64
)

// subscriber consumes an external broker's ingest topics with a persistent
// session and acknowledges each message only after Kafka has its samples.
type subscriber struct {
	cfg  config.MQTT
	in   *ingester
	log  *slog.Logger
	opts *paho.ClientOptions

	queues [extWorkers]chan delivery
	up     atomic.Bool
	mu     sync.Mutex
	client paho.Client
	stop   chan struct{}
	once   sync.Once
}

type delivery struct {
	msg      paho.Message
	received time.Time
}

func newSubscriber(cfg config.MQTT, in *ingester, log *slog.Logger) *subscriber {
	x := cfg.External
	s := &subscriber{cfg: cfg, in: in, log: log, stop: make(chan struct{})}
	for i := range s.queues {
		s.queues[i] = make(chan delivery, extQueueSize)
	}
	o := paho.NewClientOptions()
	for _, b := range x.Brokers {
		o.AddBroker(b)
	}
	o.SetClientID(x.ClientID).
		SetCleanSession(false). // the broker keeps our subscription and queues messages while we are down
		SetAutoAckDisabled(true).
		SetOrderMatters(true).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(time.Second).
		SetMaxReconnectInterval(10 * time.Second).
		SetConnectTimeout(x.ConnectTimeout).
		SetKeepAlive(30 * time.Second).
		SetResumeSubs(true)
	if x.Username != "" {
		o.SetUsername(x.Username).SetPassword(x.Password)
	}
	if x.CAFile != "" {
		o.SetTLSConfig(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: loadPool(x.CAFile, log)})
	}
	// Messages of the persistent session may arrive before Subscribe
	// returns; they take the same path.
	o.SetDefaultPublishHandler(s.onMessage)
	o.SetOnConnectHandler(func(c paho.Client) {
		t := c.Subscribe(s.filter(), 1, s.onMessage)
		if !t.WaitTimeout(x.ConnectTimeout) || t.Error() != nil {
			s.log.Error("subscribing on external mqtt broker failed; reconnecting", "filter", s.filter(), "err", t.Error())
			s.up.Store(false)
			return
		}
		s.up.Store(true)
		s.log.Info("subscribed on external mqtt broker", "brokers", x.Brokers, "filter", s.filter(), "client_id", x.ClientID)
	})
	o.SetConnectionLostHandler(func(_ paho.Client, err error) {
		s.up.Store(false)
		s.log.Warn("external mqtt broker connection lost; reconnecting", "err", err)
	})
	s.opts = o
	return s
}

func loadPool(path string, log *slog.Logger) *x509.CertPool {
	pool := x509.NewCertPool()
	pem, err := os.ReadFile(path)
	if err != nil || !pool.AppendCertsFromPEM(pem) {
		log.Error("mqtt.external.ca_file has no usable PEM certificate", "file", path, "err", err)
	}
	return pool
}

// filter is the subscription: $share/<group>/<topic> when shared.
func (s *subscriber) filter() string {
	if g := s.cfg.External.SharedGroup; g != "" {
		return "$share/" + g + "/" + s.cfg.External.Topic
	}
	return s.cfg.External.Topic
}

func (s *subscriber) connected() bool { return s.up.Load() }

// onMessage is paho's handler (one goroutine, in order): it hands the
// message to its topic's worker, blocking while that queue is full.
func (s *subscriber) onMessage(_ paho.Client, m paho.Message) {
	h := fnv.New32a()
	_, _ = h.Write([]byte(m.Topic()))
	select {
	case s.queues[h.Sum32()%extWorkers] <- delivery{msg: m, received: time.Now()}:
	case <-s.stop:
		// Stopping: not acknowledged; the broker delivers it again.
	}
}

// run connects and processes messages until ctx ends; messages not yet
// acknowledged stay with the broker's session.
func (s *subscriber) run(ctx context.Context) error {
	c := paho.NewClient(s.opts)
	s.mu.Lock()
	s.client = c
	s.mu.Unlock()
	var wg sync.WaitGroup
	for i := range s.queues {
		wg.Add(1)
		go func(q chan delivery) {
			defer wg.Done()
			s.work(ctx, q)
		}(s.queues[i])
	}
	// With ConnectRetry, Connect keeps trying in the background.
	c.Connect()
	<-ctx.Done()
	s.once.Do(func() { close(s.stop) })
	wg.Wait()
	c.Disconnect(250)
	s.up.Store(false)
	return nil
}

// work ingests the messages of one queue; a message whose samples Kafka
// did not take is retried (with backoff) until it is, or until the stop,
// when it is left unacknowledged for the broker to deliver again.
func (s *subscriber) work(ctx context.Context, q chan delivery) {
	for {
		select {
		case <-ctx.Done():
			return
		case d := <-q:
			s.one(ctx, d)
		}
	}
}

func (s *subscriber) one(ctx context.Context, d delivery) {
	m := d.msg
	origin := "mqtt-external://" + s.cfg.External.ClientID + "/" + clipTopic(m.Topic())
	backoff := 100 * time.Millisecond
	for {
		// Kafka writes finish even when ctx ends: the produce timeout
		// bounds them.
		r := s.in.handle(context.WithoutCancel(ctx), modeExternal, m.Topic(), m.Payload(), m.Qos(), origin, "")
		if r.verdict != failed {
			m.Ack()
			if m.Qos() > 0 {
				s.in.m.ackLat[modeExternal].Observe(sinceSeconds(d.received))
			}
			return
		}
		s.in.m.dropped.WithLabelValues("external", "kafka").Inc()
		s.log.Warn("external mqtt message not acknowledged: kafka unavailable; retrying", "topic", m.Topic(), "err", r.reason, "retriable", r.retriable)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func (s *subscriber) close() {
	s.once.Do(func() { close(s.stop) })
	s.mu.Lock()
	c := s.client
	s.mu.Unlock()
	if c != nil && c.IsConnectionOpen() {
		c.Disconnect(0)
	}
}
