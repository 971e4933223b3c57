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
	// What the simulator really uses, for the banner.
	p.cfg.Simulator = sc
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

// simulatorRoutes says how the simulated devices reach Vigil, for the
// banner: "beds over MLLP 127.0.0.1:2575, wearables over MQTT ..., spot
// checks over FHIR".
func simulatorRoutes(sc config.Simulator) string {
	beds, wear := "HTTP", "HTTP"
	if sc.Gateways.MLLP != "" {
		beds = "HL7 v2/MLLP " + sc.Gateways.MLLP
	}
	if sc.Gateways.MQTT != "" {
		wear = "MQTT " + sc.Gateways.MQTT
	}
	s := "beds over " + beds + ", wearables over " + wear
	if sc.Gateways.FHIR {
		s += ", temperature spot checks over FHIR"
	}
	if sc.Gateways.FaultRate > 0 {
		s += fmt.Sprintf(", %.0f%% faulty messages", 100*sc.Gateways.FaultRate)
	}
	return s
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
	fmt.Fprintf(env.stdout, "simulating %d beds and %d wearables (%d deteriorating) into %s: %s\n",
		p.cfg.Simulator.Beds, p.cfg.Simulator.Wearables, p.cfg.Simulator.Deteriorating, p.cfg.Simulator.Target,
		simulatorRoutes(p.cfg.Simulator))
	err = sim.Run(ctx)
	if rec != nil {
		err = errors.Join(err, sim.RecordErr(), rec.Close())
	}
	return err
}
