package fhir

import (
	"fmt"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/ingest/validate"
)

// ReasonSystem is the code system of the refusal reason carried in
// OperationOutcome.issue.details.coding (codes: validate.Reasons).
const ReasonSystem = "urn:vigil:refusal-reason"

// OperationOutcome is the R4 OperationOutcome of every error and of
// informational answers.
type OperationOutcome struct {
	ResourceType string  `json:"resourceType"`
	Issue        []Issue `json:"issue"`
}

// Issue is one OperationOutcome.issue.
type Issue struct {
	// Severity is fatal, error, warning or information.
	Severity string `json:"severity"`
	// Code is from the R4 IssueType value set (invalid, structure,
	// required, value, not-supported, business-rule, not-found, too-costly,
	// processing, transient, exception, informational).
	Code string `json:"code"`
	// Details carries the machine-readable refusal reason (system
	// ReasonSystem).
	Details *Concept `json:"details,omitempty"`
	// Diagnostics is a sentence for a human.
	Diagnostics string `json:"diagnostics,omitempty"`
	// Expression is the FHIRPath of the offending element.
	Expression []string `json:"expression,omitempty"`
}

// Reason returns the refusal reason of the issue, or "".
func (i *Issue) Reason() string {
	if i.Details != nil {
		for _, c := range i.Details.Coding {
			if c.System == ReasonSystem {
				return c.Code
			}
		}
	}
	return ""
}

// Concept is a CodeableConcept.
type Concept struct {
	Coding []Coding `json:"coding,omitempty"`
	Text   string   `json:"text,omitempty"`
}

// Coding is a Coding.
type Coding struct {
	System  string `json:"system,omitempty"`
	Code    string `json:"code,omitempty"`
	Display string `json:"display,omitempty"`
}

// Bundle is a batch-response or transaction-response Bundle.
type Bundle struct {
	ResourceType string  `json:"resourceType"`
	ID           string  `json:"id,omitempty"`
	Type         string  `json:"type"`
	Entry        []Entry `json:"entry"`
}

// Entry is one Bundle.entry of a response, in the order of the request's
// entries.
type Entry struct {
	FullURL  string         `json:"fullUrl,omitempty"`
	Response *EntryResponse `json:"response"`
}

// EntryResponse is Bundle.entry.response.
type EntryResponse struct {
	// Status is "201 Created", "200 OK" (a panel grouping other entries),
	// "400 Bad Request" or "422 Unprocessable Entity".
	Status       string            `json:"status"`
	Location     string            `json:"location,omitempty"`
	Etag         string            `json:"etag,omitempty"`
	LastModified string            `json:"lastModified,omitempty"`
	Outcome      *OperationOutcome `json:"outcome,omitempty"`
}

func issue(severity, code, reason, diagnostics, expr string) Issue {
	is := Issue{Severity: severity, Code: code, Diagnostics: diagnostics}
	if reason != "" {
		is.Details = &Concept{Coding: []Coding{{System: ReasonSystem, Code: reason}}}
	}
	if expr != "" {
		is.Expression = []string{expr}
	}
	return is
}

func refusalIssue(rf *refusal, severity string) Issue {
	return issue(severity, issueCode(rf.reason), string(rf.reason), rf.msg, rf.expr)
}

// outcomeOf is the OperationOutcome of one converted resource.
func outcomeOf(res *converted, _ string) *OperationOutcome {
	oo := &OperationOutcome{ResourceType: "OperationOutcome"}
	if res.refused != nil {
		oo.Issue = append(oo.Issue, refusalIssue(res.refused, "error"))
	} else if n := res.count(); n > 0 {
		oo.Issue = append(oo.Issue, issue("information", "informational", "", acceptedText(res), ""))
	}
	for i := range res.partial {
		oo.Issue = append(oo.Issue, refusalIssue(&res.partial[i], "warning"))
	}
	for _, n := range res.notes {
		oo.Issue = append(oo.Issue, issue("information", "informational", "", n, ""))
	}
	return oo
}

func acceptedText(res *converted) string {
	var parts []string
	for _, b := range res.batches {
		for _, s := range b.Samples {
			parts = append(parts, fmt.Sprintf("%s %g %s at %s", s.Metric, s.Value, s.Unit, fmtMs(s.EventTimeMs)))
		}
	}
	return fmt.Sprintf("accepted %d sample(s) of patient %s: %s", len(parts), res.patient, strings.Join(parts, "; "))
}

// issueCode maps a refusal reason onto the R4 IssueType.
func issueCode(r validate.Reason) string {
	switch r {
	case validate.MalformedMessage, validate.InvalidJSON, validate.UnknownField, validate.InvalidType:
		return "structure"
	case validate.MissingField:
		return "required"
	case validate.InvalidID, validate.NotFinite, validate.InvalidTime, validate.UnitNotConvertible:
		return "value"
	case validate.UnsupportedMessage, validate.NotVitalSign, validate.UnknownMetric, validate.UnmappedCode, validate.UnsupportedValue:
		return "not-supported"
	case validate.UnboundDevice:
		return "not-found"
	case validate.BodyTooLarge, validate.TooManySamples:
		return "too-costly"
	case validate.RateLimited:
		return "throttled"
	}
	return "business-rule"
}

// capability is the CapabilityStatement of GET /fhir/metadata.
func capability(base string, now time.Time) map[string]any {
	return map[string]any{
		"resourceType":   "CapabilityStatement",
		"status":         "active",
		"date":           now.Format("2006-01-02"),
		"publisher":      "Vigil",
		"kind":           "instance",
		"implementation": map[string]any{"description": "Vigil vital-signs ingest (write-only: Observations become canonical samples on Kafka)", "url": base},
		"fhirVersion":    "4.0.1",
		"format":         []string{"application/fhir+json", "json"},
		"rest": []any{map[string]any{
			"mode":          "server",
			"documentation": "Observations of the vital-signs profile are validated, converted and published; nothing is stored for reading.",
			"resource": []any{map[string]any{
				"type":             "Observation",
				"profile":          "http://hl7.org/fhir/StructureDefinition/Observation",
				"supportedProfile": []string{"http://hl7.org/fhir/StructureDefinition/vitalsigns", "http://hl7.org/fhir/StructureDefinition/bp", "http://hl7.org/fhir/StructureDefinition/vitalspanel"},
				"interaction":      []any{map[string]string{"code": "create"}},
			}},
			"interaction": []any{map[string]string{"code": "batch"}, map[string]string{"code": "transaction"}},
		}},
	}
}
