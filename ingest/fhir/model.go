package fhir

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// The resource model is the subset of FHIR R4 that vital signs use, decoded
// with encoding/json into these structs. It is hand-written on purpose: the
// generated R4 models for Go (github.com/samply/golang-fhir-models, the
// google/fhir protos) decode all ~150 resource types, refuse a whole
// resource on any code outside their enums without saying where, and lose
// the decimal text of values; here unknown elements are skipped (tolerant
// reader), decimals stay json.Number until they are read, every error names
// its FHIRPath, and allocation is bounded by the body size (contained
// resources and bundle entries stay raw until used).

// observation is an R4 Observation, as far as Vigil reads it.
type observation struct {
	ResourceType      string            `json:"resourceType"`
	ID                string            `json:"id"`
	Meta              json.RawMessage   `json:"meta"`
	Contained         []json.RawMessage `json:"contained"`
	ModifierExtension []json.RawMessage `json:"modifierExtension"`
	Status            string            `json:"status"`
	Category          []codeableConcept `json:"category"`
	Code              *codeableConcept  `json:"code"`
	Subject           *reference        `json:"subject"`
	Device            *reference        `json:"device"`

	EffectiveDateTime *string         `json:"effectiveDateTime"`
	EffectiveInstant  *string         `json:"effectiveInstant"`
	EffectivePeriod   *period         `json:"effectivePeriod"`
	EffectiveTiming   json.RawMessage `json:"effectiveTiming"`

	valueChoice
	DataAbsentReason *codeableConcept `json:"dataAbsentReason"`
	HasMember        []reference      `json:"hasMember"`
	Component        []component      `json:"component"`
}

// valueChoice is value[x]: Vigil reads valueQuantity and only notes which
// other type was sent.
type valueChoice struct {
	ValueQuantity        *quantity       `json:"valueQuantity"`
	ValueCodeableConcept json.RawMessage `json:"valueCodeableConcept"`
	ValueString          json.RawMessage `json:"valueString"`
	ValueBoolean         json.RawMessage `json:"valueBoolean"`
	ValueInteger         json.RawMessage `json:"valueInteger"`
	ValueRange           json.RawMessage `json:"valueRange"`
	ValueRatio           json.RawMessage `json:"valueRatio"`
	ValueSampledData     json.RawMessage `json:"valueSampledData"`
	ValueTime            json.RawMessage `json:"valueTime"`
	ValueDateTime        json.RawMessage `json:"valueDateTime"`
	ValuePeriod          json.RawMessage `json:"valuePeriod"`
}

// otherType names the non-Quantity value[x] present, or "".
func (v *valueChoice) otherType() string {
	switch {
	case v.ValueCodeableConcept != nil:
		return "valueCodeableConcept"
	case v.ValueString != nil:
		return "valueString"
	case v.ValueBoolean != nil:
		return "valueBoolean"
	case v.ValueInteger != nil:
		return "valueInteger"
	case v.ValueRange != nil:
		return "valueRange"
	case v.ValueRatio != nil:
		return "valueRatio"
	case v.ValueSampledData != nil:
		return "valueSampledData"
	case v.ValueTime != nil:
		return "valueTime"
	case v.ValueDateTime != nil:
		return "valueDateTime"
	case v.ValuePeriod != nil:
		return "valuePeriod"
	}
	return ""
}

type component struct {
	ModifierExtension []json.RawMessage `json:"modifierExtension"`
	Code              *codeableConcept  `json:"code"`
	valueChoice
	DataAbsentReason *codeableConcept `json:"dataAbsentReason"`
}

type codeableConcept struct {
	Coding []coding `json:"coding"`
	Text   string   `json:"text"`
}

type coding struct {
	System  string `json:"system"`
	Code    string `json:"code"`
	Display string `json:"display"`
}

type reference struct {
	Reference  string      `json:"reference"`
	Type       string      `json:"type"`
	Identifier *identifier `json:"identifier"`
	Display    string      `json:"display"`
}

type identifier struct {
	System string `json:"system"`
	Value  string `json:"value"`
}

type period struct {
	Start *string `json:"start"`
	End   *string `json:"end"`
}

type quantity struct {
	// Value stays raw so that a value of the wrong JSON type is refused
	// with its FHIRPath.
	Value      json.RawMessage `json:"value"`
	Comparator string          `json:"comparator"`
	Unit       string          `json:"unit"`
	System     string          `json:"system"`
	Code       string          `json:"code"`
}

// containedPatient is what Vigil reads of a contained Patient.
type containedPatient struct {
	ResourceType string       `json:"resourceType"`
	ID           string       `json:"id"`
	Identifier   []identifier `json:"identifier"`
}

// bundle is an R4 Bundle of type batch or transaction.
type bundle struct {
	ResourceType string        `json:"resourceType"`
	ID           string        `json:"id"`
	Type         string        `json:"type"`
	Entry        []bundleEntry `json:"entry"`
}

type bundleEntry struct {
	FullURL  string          `json:"fullUrl"`
	Resource json.RawMessage `json:"resource"`
	Request  *struct {
		Method string `json:"method"`
		URL    string `json:"url"`
	} `json:"request"`
}

// probe reads the resourceType of a body.
type probe struct {
	ResourceType string `json:"resourceType"`
}

// decodeError is a JSON syntax or type error with its place.
type decodeError struct {
	// Offset is the byte offset of the error in the decoded text (-1 when
	// unknown); Line and Column are 1-based (0 when unknown).
	Offset       int64
	Line, Column int
	// Path is the FHIRPath of the element whose type was wrong, "" for
	// syntax errors.
	Path string
	Msg  string
}

func (e *decodeError) Error() string { return e.Msg }

// decodeJSON unmarshals data into v; root is the FHIRPath root
// ("Observation", "Bundle") used to name a mistyped element.
func decodeJSON(data []byte, v any, root string) *decodeError {
	err := json.Unmarshal(data, v)
	if err == nil {
		return nil
	}
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		line, col := lineCol(data, se.Offset)
		return &decodeError{Offset: se.Offset, Line: line, Column: col,
			Msg: fmt.Sprintf("the body is not valid JSON: %v at line %d, column %d (byte %d)", se, line, col, se.Offset)}
	case errors.As(err, &te):
		line, col := lineCol(data, te.Offset)
		path := root
		if te.Field != "" {
			path += "." + te.Field
		}
		return &decodeError{Offset: te.Offset, Line: line, Column: col, Path: path,
			Msg: fmt.Sprintf("%s: a JSON %s where FHIR wants %s, at line %d, column %d (byte %d)",
				path, te.Value, fhirType(te.Type.String()), line, col, te.Offset)}
	}
	if strings.Contains(err.Error(), "unexpected end of JSON input") {
		line, col := lineCol(data, int64(len(data)))
		return &decodeError{Offset: int64(len(data)), Line: line, Column: col,
			Msg: fmt.Sprintf("the body is not valid JSON: it ends early, at line %d, column %d (byte %d)", line, col, len(data))}
	}
	return &decodeError{Offset: -1, Path: root, Msg: fmt.Sprintf("the body is not a valid %s: %v", root, err)}
}

func fhirType(goType string) string {
	switch {
	case strings.HasPrefix(goType, "[]"):
		return "an array"
	case goType == "string", goType == "*string":
		return "a string"
	case strings.HasSuffix(goType, "Number"):
		return "a number"
	}
	return "an object"
}

// lineCol returns the 1-based line and column of byte offset off.
func lineCol(data []byte, off int64) (line, col int) {
	if off > int64(len(data)) {
		off = int64(len(data))
	}
	line, col = 1, 1
	for _, c := range data[:off] {
		if c == '\n' {
			line++
			col = 1
		} else {
			col++
		}
	}
	return line, col
}
