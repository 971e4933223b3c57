package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/vigilhealth/vigil/ingest/replay"
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
	var rec *replay.Recording
	if env.record != "" {
		if rec, err = replay.CreateRecording(env.record); err != nil {
			return err
		}
		sim.RecordTo(rec)
	}
	fmt.Fprintf(env.stdout, "simulating %d beds and %d wearables (%d deteriorating) into %s\n",
		p.cfg.Simulator.Beds, p.cfg.Simulator.Wearables, p.cfg.Simulator.Deteriorating, p.cfg.Simulator.Target)
	err = sim.Run(ctx)
	if rec != nil {
		err = errors.Join(err, sim.RecordErr(), rec.Close())
	}
	return err
}
