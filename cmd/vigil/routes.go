package main

import (
	"context"
	"fmt"

	"github.com/vigilhealth/vigil/sinks/alertroute"
)

// addAlertRoutes registers the alert routes stage (webhooks and the
// alert-burden metrics) when alerts.routes.enabled.
func (p *platform) addAlertRoutes() error {
	if !p.cfg.Alerts.Routes.Enabled {
		return nil
	}
	s, err := alertroute.New(p.cfg, p.deps("routes"))
	if err != nil {
		return fmt.Errorf("creating alert routes: %w", err)
	}
	p.runner.AddStage("routes", s)
	return nil
}

// cmdRoutes runs the alert routes alone against a Kafka cluster.
func cmdRoutes(ctx context.Context, env *cliEnv) error {
	p := newPlatform(env)
	return p.serve(ctx,
		func() error { return p.startKafka(ctx, false) },
		func() error {
			if !p.cfg.Alerts.Routes.Enabled {
				return fmt.Errorf("alerts.routes.enabled is false: nothing to run")
			}
			return p.addAlertRoutes()
		},
	)
}
