// Package runner composes stages into one process: it starts them from the
// back of the flow to the front (sinks first, so consumers are ready before
// data arrives), and on shutdown drains them front to back (simulator, then
// ingest, then stream, then sink), so every stage finishes and commits what
// the stage before it handed over. Resources (the embedded broker, the child
// ClickHouse) are closed last, in reverse order of registration.
package runner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/vigilhealth/vigil/internal/stage"
)

type namedStage struct {
	name string
	s    stage.Stage
}

type resource struct {
	name  string
	close func(context.Context) error
}

// Runner runs stages; it is used from one goroutine.
type Runner struct {
	log          *slog.Logger
	stages       []namedStage
	resources    []resource
	stageTimeout time.Duration
}

// New returns a Runner that gives each stage stageTimeout to drain.
func New(log *slog.Logger, stageTimeout time.Duration) *Runner {
	return &Runner{log: log, stageTimeout: stageTimeout}
}

// AddStage appends a stage; add them in flow order, front (ingest) first.
func (r *Runner) AddStage(name string, s stage.Stage) {
	r.stages = append(r.stages, namedStage{name, s})
}

// PrependStage puts a stage at the front of the flow (it stops first).
func (r *Runner) PrependStage(name string, s stage.Stage) {
	r.stages = append([]namedStage{{name, s}}, r.stages...)
}

// AddResource registers something to close after every stage has stopped.
func (r *Runner) AddResource(name string, closeFn func(context.Context) error) {
	r.resources = append(r.resources, resource{name, closeFn})
}

// Close closes every registered resource in reverse order; for use when
// start-up fails before Run.
func (r *Runner) Close(ctx context.Context) error {
	var errs []error
	for i := len(r.resources) - 1; i >= 0; i-- {
		res := r.resources[i]
		if err := res.close(ctx); err != nil {
			errs = append(errs, fmt.Errorf("closing %s: %w", res.name, err))
		}
	}
	r.resources = nil
	return errors.Join(errs...)
}

// Run starts every stage and blocks until ctx ends or a stage fails; then it
// drains and closes the stages front to back and closes the resources. It
// returns the first stage failure, if any.
func (r *Runner) Run(ctx context.Context) error {
	type exit struct {
		i   int
		err error
	}
	exits := make(chan exit, len(r.stages))
	cancels := make([]context.CancelFunc, len(r.stages))
	done := make([]chan struct{}, len(r.stages))
	for i := len(r.stages) - 1; i >= 0; i-- {
		sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		cancels[i] = cancel
		done[i] = make(chan struct{})
		go func(i int) {
			err := r.stages[i].s.Run(sctx)
			close(done[i])
			exits <- exit{i, err}
		}(i)
	}
	var first error
	select {
	case <-ctx.Done():
		r.log.Info("stopping: draining stages front to back")
	case e := <-exits:
		if e.err != nil {
			first = fmt.Errorf("%s: %w", r.stages[e.i].name, e.err)
			r.log.Error("stage failed; stopping", "stage", r.stages[e.i].name, "err", e.err)
		} else {
			r.log.Info("stage finished; stopping", "stage", r.stages[e.i].name)
		}
	}
	for i, st := range r.stages {
		start := time.Now()
		cancels[i]()
		select {
		case <-done[i]:
		case <-time.After(r.stageTimeout):
			r.log.Warn("stage did not drain in time; closing it", "stage", st.name, "timeout", r.stageTimeout)
		}
		cctx, cancel := context.WithTimeout(context.Background(), r.stageTimeout)
		if err := st.s.Close(cctx); err != nil {
			r.log.Warn("closing stage", "stage", st.name, "err", err)
		}
		cancel()
		r.log.Debug("stage stopped", "stage", st.name, "took", time.Since(start))
	}
	// Collect exit errors of stages that failed while draining.
	for len(exits) > 0 {
		if e := <-exits; e.err != nil && first == nil {
			first = fmt.Errorf("%s: %w", r.stages[e.i].name, e.err)
		}
	}
	cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := r.Close(cctx); err != nil {
		r.log.Warn("closing resources", "err", err)
	}
	return first
}
