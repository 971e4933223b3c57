package main

import (
	"fmt"

	"github.com/vigilhealth/vigil/ingest/mqtt"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/httpserver"
)

// addMQTT adds the MQTT ingest stage when mqtt.embedded.enabled or
// mqtt.external.brokers is set: the embedded broker (bound here, so that
// p.cfg.MQTT.Embedded.Listen holds its real address for the banner and the
// simulator) and/or the external subscription, publishing through pub and
// resolving patients through p.bindings. Its readiness check is on srv. It
// must be called before the HTTP server and the publisher are added, so the
// stage starts after them and stops (draining its PUBACKs) before them.
func (p *platform) addMQTT(srv *httpserver.Server, pub *publish.Publisher) error {
	if !p.cfg.MQTT.Embedded.Enabled && len(p.cfg.MQTT.External.Brokers) == 0 {
		return nil
	}
	var opts []mqtt.Option
	if p.bindings != nil {
		opts = append(opts, mqtt.WithResolver(p.bindings))
	}
	svc, err := mqtt.New(p.cfg, p.deps("mqtt"), pub, opts...)
	if err != nil {
		return fmt.Errorf("creating mqtt ingest: %w", err)
	}
	if p.cfg.MQTT.Embedded.Enabled {
		p.cfg.MQTT.Embedded.Listen = svc.Addr()
	}
	srv.AddCheck("mqtt", svc.Ready)
	p.runner.AddStage("mqtt", svc)
	return nil
}

// gatewayBanner is the banner's lines for the MQTT broker and the FHIR
// endpoint ("" for what is disabled).
func (p *platform) gatewayBanner() string {
	var s string
	if p.cfg.MQTT.Embedded.Enabled {
		s += fmt.Sprintf("  MQTT        mqtt://%s  (publish QoS 1 to vigil/<tenant>/<device>/samples; mosquitto_pub -h/-p)\n", p.cfg.MQTT.Embedded.Listen)
	}
	if len(p.cfg.MQTT.External.Brokers) > 0 {
		s += fmt.Sprintf("  MQTT ext.   subscribed to %s on %v\n", p.cfg.MQTT.External.Topic, p.cfg.MQTT.External.Brokers)
	}
	if p.cfg.FHIR.Enabled {
		s += fmt.Sprintf("  FHIR R4     http://%s/fhir  (POST /fhir/Observation, POST /fhir Bundle, GET /fhir/metadata)\n", p.cfg.HTTP.Listen)
	}
	return s
}

// addMQTTAndFHIR adds the FHIR endpoints and the MQTT stage (one call in
// addIngest, after the binding store exists).
func (p *platform) addMQTTAndFHIR(srv *httpserver.Server, pub *publish.Publisher) error {
	if err := p.addFHIR(srv, pub); err != nil {
		return err
	}
	return p.addMQTT(srv, pub)
}
