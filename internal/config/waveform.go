package config

// Waveform configures the waveform path (POST /v1/waveforms and the
// R-peak detection behind it, package ingest/waveform).
type Waveform struct {
	// Enabled mounts POST /v1/waveforms on the ingest HTTP server in
	// `vigil run` and `vigil ingest`.
	Enabled bool `yaml:"enabled"`
	// MaxChannels bounds the (tenant, device, channel) detector states kept
	// in memory (about 20 KiB each at 360 Hz); the least recently used is
	// evicted beyond it (counted in vigil_waveform_evictions_total), and its
	// next chunk starts a fresh detector.
	MaxChannels int `yaml:"max_channels"`
	// MaxChunkSamples bounds the values of one chunk (one request).
	MaxChunkSamples int `yaml:"max_chunk_samples"`
}

func defaultWaveform() Waveform {
	return Waveform{Enabled: true, MaxChannels: 10_000, MaxChunkSamples: 1 << 16}
}

func (c Waveform) validate(bad func(field, format string, args ...any)) {
	if c.MaxChannels < 1 {
		bad("waveform.max_channels", "must be at least 1, got %d", c.MaxChannels)
	}
	if c.MaxChunkSamples < 1 || c.MaxChunkSamples > 1<<22 {
		bad("waveform.max_chunk_samples", "must be between 1 and 4194304, got %d", c.MaxChunkSamples)
	}
}
