package main

import (
	"fmt"

	"github.com/vigilhealth/vigil/ingest/hl7"
	"github.com/vigilhealth/vigil/ingest/mllp"
	"github.com/vigilhealth/vigil/ingest/publish"
)

// addMLLP starts the HL7 v2 listener (MLLP over TCP, TLS when mllp.tls_cert
// and tls_key are set) when mllp.enabled: ORU^R01 observations are mapped
// through p.mapping and published through pub, patients resolved and ADT
// applied through p.bindings, NA waveforms handed to p.waveforms (when the
// waveform processor runs). Its bound address replaces mllp.listen (port 0
// picks one). It must be called after addBindings and before the publisher
// and binding store are added as stages, so that the listener drains (and
// ACKs what it holds) before they stop.
func (p *platform) addMLLP(pub *publish.Publisher) error {
	if !p.cfg.MLLP.Enabled {
		return nil
	}
	opts := mllp.Options{Publisher: pub, Codes: hl7.StoreCodes(p.mapping)}
	if p.bindings != nil {
		opts.Binder = p.bindings
	}
	if p.waveforms != nil {
		opts.Waveform = p.waveforms
	}
	s, err := mllp.New(p.cfg, p.deps("mllp"), opts)
	if err != nil {
		return fmt.Errorf("creating mllp listener: %w", err)
	}
	p.cfg.MLLP.Listen = s.Addr()
	p.runner.AddStage("mllp", s)
	return nil
}

// mllpBanner is the banner line of the MLLP listener ("" when disabled).
func (p *platform) mllpBanner() string {
	if !p.cfg.MLLP.Enabled {
		return ""
	}
	scheme := "tcp"
	if p.cfg.MLLP.TLSCert != "" {
		scheme = "tls"
	}
	return fmt.Sprintf("  HL7 MLLP    %s://%s  (HL7 v2 ORU^R01 / ADT, original-mode ACK)\n", scheme, p.cfg.MLLP.Listen)
}
