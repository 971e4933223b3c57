package config

import (
	"strings"
	"testing"
)

func TestAlertsRoutesValidationNamesFields(t *testing.T) {
	c := Default()
	c.Alerts.Routes.RetryMax = 0
	c.Alerts.Routes.Webhooks = []AlertWebhook{
		{Name: "pager", URL: "https://pager.example/hook", Events: []string{"raised", "acknowledged"}, MinSeverity: "high"},
		{Name: "pager", URL: "ftp://x", Events: []string{"paged"}, MinSeverity: "urgent", Secret: "a", SecretEnv: "B"},
	}
	err := c.Validate()
	if err == nil {
		t.Fatal("invalid alerts.routes accepted")
	}
	for _, want := range []string{
		"alerts.routes.retry_max:",
		`alerts.routes.webhooks[1].name: "pager" is used twice`,
		"alerts.routes.webhooks[1].url:",
		`alerts.routes.webhooks[1].events[0]: "paged"`,
		`alerts.routes.webhooks[1].min_severity: "urgent"`,
		"alerts.routes.webhooks[1].secret_env:",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %q:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "webhooks[0]") {
		t.Errorf("the valid first webhook was reported:\n%v", err)
	}
}
