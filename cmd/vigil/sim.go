package main

import (
	"context"
	"fmt"

	"github.com/vigilhealth/vigil/simulator"
)

func (p *platform) addSimulator() error {
	sc := p.cfg.Simulator
	if sc.Target == "" || sc.Target == "http://127.0.0.1:8080" {
		sc.Target = "http://" + p.cfg.HTTP.Listen
	}
	sim, err := simulator.New(sc, p.deps("simulator"))
	if err != nil {
		return fmt.Errorf("creating simulator: %w", err)
	}
	// The simulator is the front of the flow: it stops first.
	p.runner.PrependStage("simulator", sim)
	return nil
}

func cmdSimulate(ctx context.Context, env *cliEnv) error {
	p := newPlatform(env)
	sim, err := simulator.New(p.cfg.Simulator, p.deps("simulator"))
	if err != nil {
		return err
	}
	defer sim.Close(context.Background())
	fmt.Fprintf(env.stdout, "simulating %d beds and %d wearables (%d deteriorating) into %s\n",
		p.cfg.Simulator.Beds, p.cfg.Simulator.Wearables, p.cfg.Simulator.Deteriorating, p.cfg.Simulator.Target)
	return sim.Run(ctx)
}
