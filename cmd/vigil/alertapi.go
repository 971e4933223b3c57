package main

import (
	"fmt"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/httpserver"
	"github.com/vigilhealth/vigil/sinks/alertapi"
)

// addAlertAPI mounts the alerts HTTP API (alerts.api) on the ingest HTTP
// server, publishing acknowledgements through the ingest publisher, and
// runs its read model as a stage.
func (p *platform) addAlertAPI(srv *httpserver.Server, pub *publish.Publisher) error {
	if !p.cfg.Alerts.API.Enabled {
		return nil
	}
	api, err := alertapi.New(p.cfg, p.deps("alertapi"), pub)
	if err != nil {
		return fmt.Errorf("creating alerts api: %w", err)
	}
	api.Mount(srv.Mount)
	p.alertAPI = api
	p.runner.AddStage("alert api", api)
	return nil
}
