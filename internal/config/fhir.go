package config

import (
	"strings"
	"unicode"
)

// FHIR configures the FHIR R4 ingest endpoints (POST /fhir/Observation,
// POST /fhir with a batch or transaction Bundle, GET /fhir/metadata) served
// on the HTTP API's listener.
type FHIR struct {
	// Enabled mounts the FHIR endpoints on the HTTP API.
	Enabled bool `yaml:"enabled"`
	// DefaultTenant is the tenant of requests that carry no tenant header.
	DefaultTenant string `yaml:"default_tenant"`
	// TenantHeader is the HTTP request header naming the tenant (a gateway
	// or reverse proxy sets it per hospital).
	TenantHeader string `yaml:"tenant_header"`
	// DefaultDevice is the device id of Observations without a device
	// reference (e.g. a nurse's spot check typed into the EHR).
	DefaultDevice string `yaml:"default_device"`
	// MaxBundleEntries bounds the entries of one Bundle.
	MaxBundleEntries int `yaml:"max_bundle_entries"`
	// AcceptDateOnly takes an effective[x] with day precision
	// ("2012-09-17", no time of day) as 00:00 UTC of that day, flagged
	// questionable, instead of refusing it: a vital sign needs the time it
	// was measured, but archives and EHR exports often carry only the day.
	AcceptDateOnly bool `yaml:"accept_date_only"`
}

func defaultFHIR() FHIR {
	return FHIR{
		Enabled:          true,
		DefaultTenant:    "default",
		TenantHeader:     "X-Vigil-Tenant",
		DefaultDevice:    "fhir",
		MaxBundleEntries: 1000,
	}
}

func (f FHIR) validate(bad func(field, format string, args ...any)) {
	if f.DefaultTenant == "" || strings.ContainsAny(f.DefaultTenant, "/ \t\r\n") || len(f.DefaultTenant) > 64 {
		bad("fhir.default_tenant", "%q must be set, at most 64 bytes, without '/' or spaces", f.DefaultTenant)
	}
	if f.TenantHeader == "" || strings.IndexFunc(f.TenantHeader, func(r rune) bool {
		return !(r == '-' || r == '_' || r < unicode.MaxASCII && (unicode.IsLetter(r) || unicode.IsDigit(r)))
	}) >= 0 {
		bad("fhir.tenant_header", "%q is not an HTTP header name", f.TenantHeader)
	}
	if f.DefaultDevice == "" || strings.ContainsAny(f.DefaultDevice, "\t\r\n") || len(f.DefaultDevice) > 128 ||
		strings.TrimSpace(f.DefaultDevice) != f.DefaultDevice {
		bad("fhir.default_device", "%q must be set, at most 128 bytes, without surrounding spaces", f.DefaultDevice)
	}
	if f.MaxBundleEntries < 1 {
		bad("fhir.max_bundle_entries", "must be at least 1, got %d", f.MaxBundleEntries)
	}
}
