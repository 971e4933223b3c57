// Package httpserver is Vigil's HTTP front door: one listener carrying the
// stages' handlers (ingest, API), plus /healthz (the process is alive),
// /readyz (every registered dependency answers) and /metrics (Prometheus).
//
// Handlers are mounted before Run; Run serves until its context ends, then
// stops accepting and drains in-flight requests within the shutdown timeout.
package httpserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Check is a readiness probe; it must return promptly when ctx ends.
type Check func(ctx context.Context) error

// Server is the HTTP server. Mount and AddCheck must be called before Run;
// Run and Close are safe to call from different goroutines.
type Server struct {
	mux             *http.ServeMux
	ln              net.Listener
	srv             *http.Server
	log             *slog.Logger
	shutdownTimeout time.Duration

	mu     sync.Mutex
	checks map[string]Check
	closed bool
}

// New binds listen (host:port; port 0 picks a free one) so the address is
// known before Run, and registers /healthz, /readyz and /metrics (served from
// gatherer).
func New(listen string, shutdownTimeout time.Duration, gatherer prometheus.Gatherer, log *slog.Logger) (*Server, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("listening for http on %s: %w", listen, err)
	}
	s := &Server{
		mux:             http.NewServeMux(),
		ln:              ln,
		log:             log,
		shutdownTimeout: shutdownTimeout,
		checks:          map[string]Check{},
	}
	s.srv = &http.Server{
		Handler:           s.mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	s.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	s.mux.HandleFunc("GET /readyz", s.ready)
	s.mux.Handle("GET /metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
	return s, nil
}

// Addr is the bound address.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Mount registers h for pattern (http.ServeMux syntax, e.g. "POST /v1/samples").
func (s *Server) Mount(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

// AddCheck registers a readiness check under name.
func (s *Server) AddCheck(name string, c Check) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.checks[name] = c
}

func (s *Server) ready(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	checks := maps.Clone(s.checks)
	s.mu.Unlock()
	names := slices.Sorted(maps.Keys(checks))
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	type result struct {
		Name  string `json:"name"`
		OK    bool   `json:"ok"`
		Error string `json:"error,omitempty"`
	}
	out := struct {
		Ready  bool     `json:"ready"`
		Checks []result `json:"checks"`
	}{Ready: true}
	for _, n := range names {
		res := result{Name: n, OK: true}
		if err := checks[n](ctx); err != nil {
			res.OK, res.Error, out.Ready = false, err.Error(), false
		}
		out.Checks = append(out.Checks, res)
	}
	w.Header().Set("Content-Type", "application/json")
	if !out.Ready {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(out)
}

// Run serves until ctx ends, then shuts down gracefully: it stops accepting,
// waits for in-flight requests up to the shutdown timeout, and returns nil.
func (s *Server) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.srv.Serve(s.ln) }()
	select {
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("serving http: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), s.shutdownTimeout)
	defer cancel()
	if err := s.srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("draining http requests: %w", err)
	}
	<-errc
	return nil
}

// Close stops the server at once (in-flight requests are cut); idempotent.
// After a graceful Run it has nothing left to do.
func (s *Server) Close(_ context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	err := s.srv.Close()
	_ = s.ln.Close()
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("closing http server: %w", err)
	}
	return nil
}
