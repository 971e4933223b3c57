package main

import (
	"fmt"

	"github.com/vigilhealth/vigil/ingest/binding"
	"github.com/vigilhealth/vigil/ingest/httpjson"
	"github.com/vigilhealth/vigil/internal/httpserver"
)

// addBindings creates the device/bed → patient binding store as p.bindings
// (every ingest path resolves patients through it), mounts its HTTP API
// (PUT/GET/DELETE /v1/devices/{id}/binding) and readiness check on srv, and
// lets the HTTP JSON handler h resolve samples without a patient. The caller
// adds p.bindings as a stage after the stages that use it, so that it starts
// before them and stops after them.
func (p *platform) addBindings(srv *httpserver.Server, h *httpjson.Handler) error {
	if p.bindings == nil {
		s, err := binding.New(p.cfg, p.deps("bindings"))
		if err != nil {
			return fmt.Errorf("creating binding store: %w", err)
		}
		p.bindings = s
	}
	binding.NewHandler(p.bindings, p.log.With("stage", "bindings"), nil).Mount(srv)
	srv.AddCheck("bindings", p.bindings.Check)
	h.SetResolver(p.bindings)
	return nil
}
