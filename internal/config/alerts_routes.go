package config

import (
	"fmt"
	"net/url"
	"slices"
	"time"
)

// AlertsRoutes configures the alert routes stage (package sinks/alertroute):
// it consumes vigil.alerts.v1 in its own consumer group, delivers lifecycle
// events to webhooks (HMAC-signed, retried with backoff, dead-lettered after
// the last attempt) and exports the alert-burden metrics. The Kafka topic
// itself is always a route: every event is on it whether or not webhooks
// are configured.
type AlertsRoutes struct {
	// Enabled runs the stage in `vigil run` (it also exports the burden
	// metrics when no webhook is configured).
	Enabled bool `yaml:"enabled"`
	// Group is the stage's consumer group: offsets are committed only after
	// an event was delivered to every route that takes it, or
	// dead-lettered.
	Group string `yaml:"group"`
	// Webhooks are the HTTP routes; names must be unique.
	Webhooks []AlertWebhook `yaml:"webhooks"`
	// MaxAttempts is how many times a delivery is tried before it is
	// dead-lettered (reason webhook_failed).
	MaxAttempts int `yaml:"max_attempts"`
	// RetryInitial and RetryMax bound the exponential backoff (with
	// jitter) between attempts; a Retry-After header is honoured up to
	// RetryMax.
	RetryInitial time.Duration `yaml:"retry_initial"`
	RetryMax     time.Duration `yaml:"retry_max"`
	// Timeout bounds one HTTP attempt (connect to response headers and
	// body), unless the route sets its own.
	Timeout time.Duration `yaml:"timeout"`
	// QueueSize bounds each route's queue of events waiting for delivery.
	QueueSize int `yaml:"queue_size"`
	// QueueWait is how long the consumer waits for room in a full route
	// queue before it dead-letters that route's event (reason
	// webhook_overflow), so one slow webhook cannot stall the others.
	QueueWait time.Duration `yaml:"queue_wait"`
	// InFlight is the number of concurrent deliveries per route (events of
	// one route may then arrive out of order; receivers order by
	// event_time_ms and de-duplicate on the idempotency key).
	InFlight int `yaml:"in_flight"`
	// DrainTimeout bounds finishing queued deliveries on shutdown; what is
	// not delivered by then is not committed and is delivered again after
	// a restart.
	DrainTimeout time.Duration `yaml:"drain_timeout"`
	// BurdenWindow is the trailing window of the alerts-per-bed-per-day
	// gauges (ending at the newest event time seen).
	BurdenWindow time.Duration `yaml:"burden_window"`
	// MaxWards bounds the wards (and MaxRules the rules) that get their own
	// burden series; further ones are counted under "_other".
	MaxWards int `yaml:"max_wards"`
	MaxRules int `yaml:"max_rules"`
	// MaxBedsPerWard bounds the distinct locations remembered per ward for
	// the per-bed gauge; locations beyond it are counted as not tracked.
	MaxBedsPerWard int `yaml:"max_beds_per_ward"`
}

// AlertWebhook is one webhook route.
type AlertWebhook struct {
	// Name labels the route in metrics and dead letters.
	Name string `yaml:"name"`
	// URL receives a POST of each event as JSON (protobuf JSON of
	// vigil.v1.AlertEvent, proto field names).
	URL string `yaml:"url"`
	// Events are the event types the route takes (raised, rechecked,
	// escalated, acknowledged, resolved, suppressed); empty takes all.
	Events []string `yaml:"events"`
	// MinSeverity is the lowest severity the route takes: low, medium or
	// high; empty takes all.
	MinSeverity string `yaml:"min_severity"`
	// Rules and Wards restrict the route to those rules and wards; empty
	// takes all.
	Rules []string `yaml:"rules"`
	Wards []string `yaml:"wards"`
	// Secret is the HMAC-SHA256 key signing each body (header
	// X-Vigil-Signature: sha256=<hex> over "<X-Vigil-Timestamp>.<body>");
	// empty sends no signature (see secret_env).
	Secret string `yaml:"secret"`
	// SecretEnv names an environment variable holding the secret instead,
	// so the config file need not hold it; read when the stage starts.
	SecretEnv string `yaml:"secret_env"`
	// Timeout overrides alerts.routes.timeout for this route.
	Timeout time.Duration `yaml:"timeout"`
}

// alertEventTypes are the event type labels a webhook may select.
var alertEventTypes = []string{"raised", "rechecked", "escalated", "acknowledged", "resolved", "suppressed"}

// alertSeverities are the severities, lowest first.
var alertSeverities = []string{"low", "medium", "high"}

func defaultAlertsRoutes() AlertsRoutes {
	return AlertsRoutes{
		Enabled:        true,
		Group:          "vigil-alert-routes",
		MaxAttempts:    6,
		RetryInitial:   500 * time.Millisecond,
		RetryMax:       30 * time.Second,
		Timeout:        10 * time.Second,
		QueueSize:      1024,
		QueueWait:      5 * time.Second,
		InFlight:       4,
		DrainTimeout:   30 * time.Second,
		BurdenWindow:   24 * time.Hour,
		MaxWards:       256,
		MaxRules:       128,
		MaxBedsPerWard: 4096,
	}
}

func (c AlertsRoutes) validate(bad func(field, format string, args ...any)) {
	const p = "alerts.routes."
	if c.Group == "" {
		bad(p+"group", "must not be empty")
	}
	if c.MaxAttempts < 1 || c.MaxAttempts > 100 {
		bad(p+"max_attempts", "must be between 1 and 100, got %d", c.MaxAttempts)
	}
	if c.RetryInitial <= 0 {
		bad(p+"retry_initial", "must be positive, got %s", c.RetryInitial)
	}
	if c.RetryMax < c.RetryInitial {
		bad(p+"retry_max", "must be at least retry_initial %s, got %s", c.RetryInitial, c.RetryMax)
	}
	if c.Timeout <= 0 {
		bad(p+"timeout", "must be positive, got %s", c.Timeout)
	}
	if c.QueueSize < 1 {
		bad(p+"queue_size", "must be at least 1, got %d", c.QueueSize)
	}
	if c.QueueWait < 0 {
		bad(p+"queue_wait", "must not be negative, got %s", c.QueueWait)
	}
	if c.InFlight < 1 || c.InFlight > 256 {
		bad(p+"in_flight", "must be between 1 and 256, got %d", c.InFlight)
	}
	if c.DrainTimeout <= 0 {
		bad(p+"drain_timeout", "must be positive, got %s", c.DrainTimeout)
	}
	if c.BurdenWindow < time.Hour {
		bad(p+"burden_window", "must be at least 1h, got %s", c.BurdenWindow)
	}
	if c.MaxWards < 1 {
		bad(p+"max_wards", "must be at least 1, got %d", c.MaxWards)
	}
	if c.MaxRules < 1 {
		bad(p+"max_rules", "must be at least 1, got %d", c.MaxRules)
	}
	if c.MaxBedsPerWard < 1 {
		bad(p+"max_beds_per_ward", "must be at least 1, got %d", c.MaxBedsPerWard)
	}
	for i, w := range c.Webhooks {
		f := fmt.Sprintf(p+"webhooks[%d].", i)
		switch {
		case w.Name == "":
			bad(f+"name", "must not be empty")
		case slices.ContainsFunc(c.Webhooks[:i], func(o AlertWebhook) bool { return o.Name == w.Name }):
			bad(f+"name", "%q is used twice", w.Name)
		}
		if u, err := url.Parse(w.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			bad(f+"url", "must be an absolute http(s) URL, got %q", w.URL)
		}
		for j, e := range w.Events {
			if !slices.Contains(alertEventTypes, e) {
				bad(fmt.Sprintf(f+"events[%d]", j), "%q is not one of %v", e, alertEventTypes)
			}
		}
		if w.MinSeverity != "" && !slices.Contains(alertSeverities, w.MinSeverity) {
			bad(f+"min_severity", "%q is not one of %v", w.MinSeverity, alertSeverities)
		}
		if w.Secret != "" && w.SecretEnv != "" {
			bad(f+"secret_env", "set secret or secret_env, not both")
		}
		if w.Timeout < 0 {
			bad(f+"timeout", "must not be negative, got %s", w.Timeout)
		}
	}
}
