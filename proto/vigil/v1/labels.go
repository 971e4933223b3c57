package vigilv1

import "strings"

// This file is written by hand (not generated): the lowercase labels of the
// enums, used alike as Kafka keys, Prometheus label values and ClickHouse
// column values, so that every part of Vigil spells them the same way.

// enumLabel is an enum value's name without its type prefix, in lower case;
// "unspecified" for the zero value and "unknown" for a number this build
// does not know.
func enumLabel(names map[int32]string, n int32, prefix string) string {
	if n == 0 {
		return "unspecified"
	}
	name, ok := names[n]
	if !ok {
		return "unknown"
	}
	return strings.ToLower(strings.TrimPrefix(name, prefix))
}

// Label is the source's lowercase name: "http", "mllp", "mqtt", "fhir",
// "replay", "simulator".
func (s Source) Label() string { return enumLabel(Source_name, int32(s), "SOURCE_") }

// Label is the event type's lowercase name: "raised", "rechecked",
// "escalated", "acknowledged", "resolved", "suppressed".
func (t AlertEventType) Label() string {
	return enumLabel(AlertEventType_name, int32(t), "ALERT_EVENT_")
}

// Label is the window kind's lowercase name: "tumbling", "hopping", "session".
func (k WindowKind) Label() string { return enumLabel(WindowKind_name, int32(k), "WINDOW_KIND_") }
