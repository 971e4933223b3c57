package config

import "time"

// RateLimit bounds what one source (an HTTP sender's tenant+device, else its
// address; an MLLP connection; an MQTT client) may send, with a token bucket
// per source: the bucket refills at SamplesPerSecond and holds at most Burst
// samples. Over the limit, HTTP answers 429 with Retry-After, MLLP and MQTT
// slow down, so a gateway replaying its history cannot starve live monitors.
type RateLimit struct {
	// SamplesPerSecond is the sustained samples per second allowed per
	// source; 0 = unlimited.
	SamplesPerSecond float64 `yaml:"samples_per_second"`
	// Burst is how many samples a source may send at once above the
	// sustained rate (the bucket size); 0 = one second's worth.
	Burst int `yaml:"burst"`
	// MaxSources bounds the per-source buckets kept (least recently used
	// ones are dropped, counted in vigil_ingest_rate_limit_evictions_total).
	MaxSources int `yaml:"max_sources"`
}

func defaultRateLimit() RateLimit {
	return RateLimit{SamplesPerSecond: 50000, Burst: 100000, MaxSources: 100000}
}

// validateExtra checks the ingest settings of the mapping, dedupe and rate
// limit parts.
func (c Ingest) validateExtra(bad func(field, format string, args ...any)) {
	if c.MappingReload < 100*time.Millisecond {
		bad("ingest.mapping_reload", "must be at least 100ms, got %s", c.MappingReload)
	}
	if c.DedupeWindow < 0 {
		bad("ingest.dedupe_window", "must not be negative")
	}
	if c.DedupeWindow > 0 && c.DedupeMaxEntries < 1 {
		bad("ingest.dedupe_max_entries", "must be at least 1 when ingest.dedupe_window is set, got %d", c.DedupeMaxEntries)
	}
	if c.RateLimit.SamplesPerSecond < 0 {
		bad("ingest.rate_limit.samples_per_second", "must not be negative")
	}
	if c.RateLimit.Burst < 0 {
		bad("ingest.rate_limit.burst", "must not be negative")
	}
	if c.RateLimit.MaxSources < 1 {
		bad("ingest.rate_limit.max_sources", "must be at least 1, got %d", c.RateLimit.MaxSources)
	}
}
