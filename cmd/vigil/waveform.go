package main

import (
	"fmt"

	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/waveform"
	"github.com/vigilhealth/vigil/internal/httpserver"
)

// addWaveforms mounts POST /v1/waveforms (ECG chunks → R peaks → rr_interval
// samples) on srv, publishing through pub, when waveform.enabled.
func (p *platform) addWaveforms(srv *httpserver.Server, pub *publish.Publisher) error {
	if !p.cfg.Waveform.Enabled {
		return nil
	}
	deps := p.deps("waveform")
	proc, err := waveform.NewProcessor(pub, waveform.Options{
		MaxChannels: p.cfg.Waveform.MaxChannels, MaxChunkSamples: p.cfg.Waveform.MaxChunkSamples,
	}, deps)
	if err != nil {
		return fmt.Errorf("creating waveform processor: %w", err)
	}
	p.waveforms = proc
	h, err := waveform.NewHandler(proc, pub, p.cfg.HTTP.MaxBodyBytes, p.cfg.Ingest.DeadLetterRawLimit, deps)
	if err != nil {
		return fmt.Errorf("creating waveform handler: %w", err)
	}
	srv.Mount("POST "+waveform.Path, h)
	return nil
}
