package main

import (
	"fmt"

	"github.com/vigilhealth/vigil/ingest/fhir"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/httpserver"
)

// addFHIR mounts the FHIR R4 endpoints (POST /fhir/Observation, POST /fhir
// with a batch or transaction Bundle, GET /fhir/metadata) on srv when
// fhir.enabled, publishing through pub, mapping codes with the hot-reloaded
// p.mapping tables and resolving Observations without a subject through
// p.bindings. It runs no stage of its own: requests drain with srv.
func (p *platform) addFHIR(srv *httpserver.Server, pub *publish.Publisher) error {
	if !p.cfg.FHIR.Enabled {
		return nil
	}
	var opts fhir.Options
	if p.mapping != nil {
		m := p.mapping
		opts.Codes = func() fhir.Codes { return m.Tables() }
	}
	if p.bindings != nil {
		opts.Binder = p.bindings
	}
	h, err := fhir.New(p.cfg, p.deps("fhir"), pub, opts)
	if err != nil {
		return fmt.Errorf("creating fhir ingest: %w", err)
	}
	h.Mount(srv.Mount)
	return nil
}
