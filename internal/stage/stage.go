// Package stage fixes what every stage of the flow (ingest, stream, sink,
// api, simulator) takes and how it starts and stops, so that `vigil run` can
// compose them and each `vigil <stage>` subcommand can run one alone.
//
// The lifecycle of a stage value s:
//
//	s, err := pkg.New(cfg, deps)   // validates, connects nothing slow
//	err = s.Run(ctx)               // blocks; returns nil when ctx is cancelled
//	                               // after finishing and committing in-flight work
//	err = s.Close(ctx)             // releases resources; idempotent
//
// Shutdown drains front to back: the runner cancels the first stage's
// context, waits for its Run to return, closes it, then moves to the next.
package stage

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/internal/clock"
)

// Deps are the dependencies passed into every stage; none are global.
type Deps struct {
	Log     *slog.Logger
	Metrics prometheus.Registerer
	Clock   clock.Clock
}

// WithDefaults fills nil fields with a discarding logger, a private registry
// and the system clock (handy in tests).
func (d Deps) WithDefaults() Deps {
	if d.Log == nil {
		d.Log = slog.New(slog.DiscardHandler)
	}
	if d.Metrics == nil {
		d.Metrics = prometheus.NewRegistry()
	}
	if d.Clock == nil {
		d.Clock = clock.System{}
	}
	return d
}

// Stage is what the runner composes.
type Stage interface {
	// Run blocks until ctx is cancelled (returning nil after draining) or a
	// fatal error occurs.
	Run(ctx context.Context) error
	// Close releases resources; it is idempotent.
	Close(ctx context.Context) error
}

// Register registers every collector on reg, or none: on the first failure
// it unregisters those it already registered and returns an error naming
// what ("stream metrics") and the collector that failed.
func Register(reg prometheus.Registerer, what string, cs ...prometheus.Collector) error {
	for i, c := range cs {
		if err := reg.Register(c); err != nil {
			for _, r := range cs[:i] {
				reg.Unregister(r)
			}
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				return fmt.Errorf("registering %s: %w (is another one registered on the same registry?)", what, err)
			}
			return fmt.Errorf("registering %s: %w", what, err)
		}
	}
	return nil
}
