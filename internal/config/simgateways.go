package config

import (
	"fmt"
	"net"
)

// SimGateways chooses how the simulator's devices reach Vigil, like the
// gateways of a real hospital: bedside monitors through an HL7 v2 (IHE
// PCD-01) gateway over MLLP, wearables over MQTT, nurses' spot checks from
// the EHR over FHIR. Paths left empty go through the HTTP JSON API.
type SimGateways struct {
	// Auto makes `vigil run --simulate` send through the process's own
	// gateways when they run and mllp/mqtt are not set: beds over its MLLP
	// listener, wearables over its embedded MQTT broker, spot checks over
	// its FHIR endpoint.
	Auto bool `yaml:"auto"`
	// MLLP is host:port of the HL7 v2 MLLP listener; when set, ICU beds send
	// PCD-01 ORU^R01 messages there (one per bed and second, after an ADT^A01
	// admitting the bed's patient). `vigil run --simulate` sets it to its own
	// listener when mllp is enabled.
	MLLP string `yaml:"mllp"`
	// MLLPConnections is how many MLLP connections the bed gateway keeps.
	MLLPConnections int `yaml:"mllp_connections"`
	// MQTT is host:port of the MQTT broker; when set, wearables publish
	// (QoS 1) to vigil/<tenant>/<device>/samples. `vigil run --simulate` sets
	// it to the embedded broker when it runs.
	MQTT string `yaml:"mqtt"`
	// FHIR sends the beds' temperature readings as nurses' spot checks:
	// FHIR R4 Observations (vital-signs profile) in a batch Bundle to
	// <target>/fhir, instead of through the monitor.
	FHIR bool `yaml:"fhir"`
	// FaultRate is how many faulty messages (0..1 per good message) the
	// gateways inject beside the good ones: alternately malformed (broken
	// HL7 syntax, invalid JSON, an invalid FHIR resource) and carrying a
	// code no mapping knows, to show refusals and dead letters at work.
	FaultRate float64 `yaml:"fault_rate"`
}

func defaultSimGateways() SimGateways {
	return SimGateways{Auto: true, MLLPConnections: 4}
}

func (g SimGateways) validate(bad func(field, format string, args ...any)) {
	for field, addr := range map[string]string{"simulator.gateways.mllp": g.MLLP, "simulator.gateways.mqtt": g.MQTT} {
		if addr == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			bad(field, "%q is not host:port", addr)
		}
	}
	if g.MLLPConnections < 1 {
		bad("simulator.gateways.mllp_connections", "must be at least 1, got %d", g.MLLPConnections)
	}
	if g.FaultRate < 0 || g.FaultRate > 1 {
		bad("simulator.gateways.fault_rate", "%s is not between 0 and 1", fmt.Sprint(g.FaultRate))
	}
}
