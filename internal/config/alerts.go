package config

// Alerts configures the alert lifecycle (rules, hysteresis, re-check,
// suppression, escalation, resolution), the alerts HTTP API and the alert
// routes (webhooks). Each part lives in its own file of this package.
type Alerts struct {
	// Lifecycle configures the alert rules and their timers.
	Lifecycle AlertsLifecycle `yaml:"lifecycle"`
	// API configures the alerts HTTP API.
	API AlertsAPI `yaml:"api"`
	// Routes configures the webhook routes and the alert-burden metrics.
	Routes AlertsRoutes `yaml:"routes"`
}

func defaultAlerts() Alerts {
	return Alerts{
		Lifecycle: defaultAlertsLifecycle(),
		API:       defaultAlertsAPI(),
		Routes:    defaultAlertsRoutes(),
	}
}

func (c Alerts) validate(bad func(field, format string, args ...any)) {
	c.Lifecycle.validate(bad)
	c.API.validate(bad)
	c.Routes.validate(bad)
}
