package config

import "time"

// AlertsLifecycle configures the alert lifecycle the stream stage runs
// (package detectors/alerting): rules with hysteresis, re-check,
// de-duplication, suppression after acknowledgement, escalation and
// resolution, all defined per rule in the rules file.
type AlertsLifecycle struct {
	// Rules is an alert rules file (the format of
	// detectors/alerting/rules.yaml: per rule the score kind or window
	// feature it reads, raise and clear thresholds, re-check, resolve_after,
	// suppress_after_ack, escalate_after and max_tier). Empty uses the
	// embedded rules: the NEWS2 aggregate >= 5 and single-parameter-3
	// triggers. Every alert event names the file's name, version and sha256.
	Rules string `yaml:"rules"`
	// TimerCheckInterval is how often (wall clock) the stream stage looks
	// for alert timers that are due (re-check timeouts, escalations); whether
	// one is due is decided on the stage's processing clock. It bounds how
	// late a timer fires.
	TimerCheckInterval time.Duration `yaml:"timer_check_interval"`
}

func defaultAlertsLifecycle() AlertsLifecycle {
	return AlertsLifecycle{TimerCheckInterval: time.Second}
}

func (c AlertsLifecycle) validate(bad func(field, format string, args ...any)) {
	if c.TimerCheckInterval < 10*time.Millisecond || c.TimerCheckInterval > time.Minute {
		bad("alerts.lifecycle.timer_check_interval", "must be between 10ms and 1m, got %s", c.TimerCheckInterval)
	}
}

// AlertsAPI configures the alerts HTTP API (package sinks/alertapi), mounted
// on the ingest HTTP server: GET /v1/alerts, GET /v1/alerts/{id} and POST
// /v1/alerts/{id}/ack, served from a read model of topic kafka.topics.alerts.
type AlertsAPI struct {
	// Enabled mounts the API wherever the ingest HTTP server runs.
	Enabled bool `yaml:"enabled"`
	// AckWait is how long POST /v1/alerts/{id}/ack waits, once the
	// acknowledgement is durable in Kafka, for the stream stage's
	// ACKNOWLEDGED event to answer 200 with the alert; after it the answer
	// is 202 Accepted.
	AckWait time.Duration `yaml:"ack_wait"`
	// MaxClosed bounds the resolved (or re-checked away) alerts the read
	// model keeps, least recently changed dropped first (counted in
	// vigil_alertapi_evicted_total); open alerts are always kept.
	MaxClosed int `yaml:"max_closed"`
	// MaxOpen bounds the open alerts the read model keeps (a safety limit:
	// beyond it the oldest are dropped and counted too).
	MaxOpen int `yaml:"max_open"`
}

func defaultAlertsAPI() AlertsAPI {
	return AlertsAPI{Enabled: true, AckWait: 2 * time.Second, MaxClosed: 10000, MaxOpen: 100000}
}

func (c AlertsAPI) validate(bad func(field, format string, args ...any)) {
	if c.AckWait < 0 || c.AckWait > time.Minute {
		bad("alerts.api.ack_wait", "must be between 0 and 1m, got %s", c.AckWait)
	}
	if c.MaxClosed < 1 {
		bad("alerts.api.max_closed", "must be at least 1, got %d", c.MaxClosed)
	}
	if c.MaxOpen < 1 {
		bad("alerts.api.max_open", "must be at least 1, got %d", c.MaxOpen)
	}
}
