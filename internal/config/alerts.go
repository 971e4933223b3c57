package config

// Alerts configures the alert lifecycle (rules, hysteresis, re-check,
// suppression, escalation, resolution), the alerts HTTP API and the alert
// routes (webhooks). Each part lives in its own file of this package.
type Alerts struct {
}

func defaultAlerts() Alerts { return Alerts{} }

func (c Alerts) validate(bad func(field, format string, args ...any)) {
}
