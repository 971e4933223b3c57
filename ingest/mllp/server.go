package mllp

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/ingest/validate"
	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
)

// Server is the MLLP listener, a stage: it accepts up to
// mllp.max_connections connections (more wait in the accept backlog),
// reads frames from each, runs every message through the Handler one after
// another per connection (so a sender's messages keep their order and each
// waits for its ACK), and writes the ACK back. Memory is bounded by
// connections × mllp.max_message_bytes; a slow Kafka delays ACKs and so
// the senders.
type Server struct {
	ln       net.Listener
	h        *Handler
	log      *slog.Logger
	cfg      config.MLLP
	kafka    config.Kafka
	sem      chan struct{}
	conns    prometheus.Gauge
	garbage  prometheus.Counter
	tooLarge prometheus.Counter

	mu       sync.Mutex
	closed   bool
	open     map[net.Conn]struct{}
	wg       sync.WaitGroup
	stopRead chan struct{}
}

// New creates the MLLP stage for cfg (section mllp; validation limits and
// catalogue of cfg.Ingest), binds its listener (so Addr is known before
// Run; with TLS when mllp.tls_cert and tls_key are set), and registers its
// metrics on deps.Metrics.
func New(cfg config.Config, deps stage.Deps, opts Options) (*Server, error) {
	deps = deps.WithDefaults()
	if opts.Publisher == nil {
		return nil, errors.New("creating mllp listener: no publisher")
	}
	cat, err := catalog.Load(cfg.Ingest.Catalog)
	if err != nil {
		return nil, err
	}
	s := &Server{
		log:      deps.Log,
		cfg:      cfg.MLLP,
		kafka:    cfg.Kafka,
		sem:      make(chan struct{}, max(cfg.MLLP.MaxConnections, 1)),
		open:     map[net.Conn]struct{}{},
		stopRead: make(chan struct{}),
		conns: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vigil_mllp_connections",
			Help: "Open MLLP connections.",
		}),
		garbage: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_mllp_garbage_bytes_total",
			Help: "Bytes skipped outside MLLP frames (not counting NUL and line-break padding).",
		}),
		tooLarge: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_mllp_frames_too_large_total",
			Help: "Frames refused (AR) because they exceeded mllp.max_message_bytes.",
		}),
	}
	s.h = newHandler(cfg, deps.Log, deps.Clock, validate.New(cat, validate.LimitsFrom(cfg.Ingest)), opts, newHandlerMetrics())
	if err := s.h.register(deps.Metrics); err != nil {
		return nil, err
	}
	if err := stage.Register(deps.Metrics, "mllp connection metrics", s.conns, s.garbage, s.tooLarge); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", cfg.MLLP.Listen)
	if err != nil {
		return nil, fmt.Errorf("listening for mllp on %s: %w", cfg.MLLP.Listen, err)
	}
	if cfg.MLLP.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(cfg.MLLP.TLSCert, cfg.MLLP.TLSKey)
		if err != nil {
			_ = ln.Close()
			return nil, fmt.Errorf("loading mllp tls certificate: %w", err)
		}
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	}
	s.ln = ln
	return s, nil
}

// Addr is the bound address.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// TLS reports whether the listener speaks TLS.
func (s *Server) TLS() bool { return s.cfg.TLSCert != "" }

// Handler is the message handler the server runs (for tests and other
// transports).
func (s *Server) Handler() *Handler { return s.h }

// Run first refills the duplicate filter from the samples topic (see
// warmDedupe), then accepts connections until ctx ends; then it stops accepting, lets
// every connection finish (and ACK) the message it is processing, closes
// them and returns nil.
func (s *Server) Run(ctx context.Context) error {
	// Connections wait in the accept backlog while the duplicate filter
	// learns what was accepted before a restart.
	if n, err := s.warmDedupe(ctx, s.kafka); err != nil {
		s.log.Warn("mllp dedupe warm-up incomplete: messages re-sent from before it may be stored twice until merged", "ids", n, "err", err)
	} else if n > 0 {
		s.log.Info("mllp dedupe warmed up from the samples topic", "ids", n)
	}
	errc := make(chan error, 1)
	go func() { errc <- s.accept() }()
	select {
	case err := <-errc:
		s.drain()
		if s.isClosed() {
			return nil
		}
		return fmt.Errorf("accepting mllp connections: %w", err)
	case <-ctx.Done():
	}
	s.drain()
	<-errc
	return nil
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// drain stops accepting and reading, then waits for in-flight messages.
func (s *Server) drain() {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		close(s.stopRead)
		_ = s.ln.Close()
	}
	// Interrupt blocked reads; a connection busy with a message notices
	// after writing its ACK.
	for c := range s.open {
		_ = c.SetReadDeadline(time.Now())
	}
	s.mu.Unlock()
	s.wg.Wait()
}

func (s *Server) accept() error {
	for {
		select {
		case s.sem <- struct{}{}:
		case <-s.stopRead:
			return net.ErrClosed
		}
		c, err := s.ln.Accept()
		if err != nil {
			<-s.sem
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return err
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			_ = c.Close()
			<-s.sem
			return net.ErrClosed
		}
		s.open[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		s.conns.Inc()
		go s.serve(c)
	}
}

// serve reads and answers the frames of one connection, one at a time.
func (s *Server) serve(c net.Conn) {
	defer func() {
		_ = c.Close()
		s.mu.Lock()
		delete(s.open, c)
		s.mu.Unlock()
		s.conns.Dec()
		<-s.sem
		s.wg.Done()
	}()
	remote := c.RemoteAddr().String()
	r := NewReader(c, s.cfg.MaxMessageBytes)
	var out []byte
	// Messages in flight finish even while the server drains: their
	// context ends only with the ACK timeout.
	ctx := context.Background()
	for {
		select {
		case <-s.stopRead:
			return
		default:
		}
		_ = c.SetReadDeadline(time.Now().Add(s.cfg.ReadTimeout))
		before := r.Garbage
		msg, err := r.Next()
		if r.Garbage > before {
			s.garbage.Add(float64(r.Garbage - before))
		}
		var ack []byte
		switch {
		case err == nil:
			ack = s.h.Handle(ctx, msg, remote)
		case errors.Is(err, ErrTooLarge):
			s.tooLarge.Inc()
			ack = s.h.tooLarge(ctx, remote, msg, s.cfg.MaxMessageBytes)
		default:
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !isTimeout(err) {
				s.log.Debug("mllp connection ended", "remote", remote, "err", err)
			}
			return
		}
		out = AppendFrame(out[:0], ack)
		_ = c.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
		if _, err := c.Write(out); err != nil {
			s.log.Debug("writing mllp ack", "remote", remote, "err", err)
			return
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Close stops the listener and cuts every connection at once; idempotent.
// After Run returned it has nothing left to do.
func (s *Server) Close(_ context.Context) error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		close(s.stopRead)
		_ = s.ln.Close()
	}
	for c := range s.open {
		_ = c.Close()
	}
	s.mu.Unlock()
	return nil
}
