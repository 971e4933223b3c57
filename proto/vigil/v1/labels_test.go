package vigilv1

import "testing"

func TestLabels(t *testing.T) {
	for got, want := range map[string]string{
		Source_SOURCE_HTTP.Label():                      "http",
		Source_SOURCE_SIMULATOR.Label():                 "simulator",
		Source(0).Label():                               "unspecified",
		Source(99).Label():                              "unknown",
		AlertEventType_ALERT_EVENT_RAISED.Label():       "raised",
		AlertEventType_ALERT_EVENT_ACKNOWLEDGED.Label(): "acknowledged",
		AlertEventType(0).Label():                       "unspecified",
		WindowKind_WINDOW_KIND_TUMBLING.Label():         "tumbling",
	} {
		if got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
}
