package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/vigilhealth/vigil/ingest/replay"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/simulator"
)

func (p *platform) addSimulator() error {
	sc := p.cfg.Simulator
	if sc.Target == "" || sc.Target == "http://127.0.0.1:8080" {
		sc.Target = "http://" + p.cfg.HTTP.Listen
	}
	sc.Gateways = p.autoGateways(sc.Gateways)
	sim, err := simulator.New(sc, p.deps("simulator"))
	if err != nil {
		return fmt.Errorf("creating simulator: %w", err)
	}
	// A restart resumes after what the last run sent, rather than sending
	// its pre-roll again over that time (duplicate samples).
	sim.ResumeFrom(p.cfg.Path("simulator", "sent.mark"))
	// The simulator is the front of the flow: it stops first.
	p.runner.PrependStage("simulator", sim)
	return nil
}

// autoGateways points the simulator's gateways at this process's own
// listeners when simulator.gateways.auto is set and they are not chosen
// explicitly: beds over the MLLP listener (plain TCP only), wearables over
// the embedded MQTT broker, spot checks over the FHIR endpoint. The
// listeners' bound addresses are in p.cfg once addIngest has run.
func (p *platform) autoGateways(g config.SimGateways) config.SimGateways {
	if !g.Auto {
		return g
	}
	if g.MLLP == "" && p.cfg.MLLP.Enabled && p.cfg.MLLP.TLSCert == "" {
		g.MLLP = p.cfg.MLLP.Listen
	}
	if g.MQTT == "" && p.cfg.MQTT.Embedded.Enabled && p.cfg.MQTT.Embedded.TLS.CertFile == "" {
		g.MQTT = p.cfg.MQTT.Embedded.Listen
	}
	if p.cfg.FHIR.Enabled {
		g.FHIR = true
	}
	return g
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
