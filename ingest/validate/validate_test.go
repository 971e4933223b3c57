package validate

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/internal/catalog"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

var now = time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC).UnixMilli()

func limits() Limits {
	return Limits{MaxFutureSkew: 5 * time.Minute, BackfillAge: 24 * time.Hour, MaxAge: 30 * 24 * time.Hour}
}

func good() Input {
	return Input{Tenant: "st-mary", Patient: "p-001", Device: "bed-7", Metric: "heart_rate", Value: 72,
		HasValue: true, Unit: "/min", EventTimeMs: now - 1000, HasTime: true, Sequence: 17, Channel: "ecg-1"}
}

func TestSampleAccepted(t *testing.T) {
	const converted = uint32(vigilv1.QualityFlag_QUALITY_CONVERTED)
	const backfill = uint32(vigilv1.QualityFlag_QUALITY_BACKFILL)
	cases := []struct {
		name    string
		mutate  func(*Input)
		metric  string
		value   float64
		unit    string
		quality uint32
		code    string
	}{
		{"canonical", func(*Input) {}, "heart_rate", 72, "/min", 0, ""},
		{"empty unit is canonical", func(in *Input) { in.Unit = "" }, "heart_rate", 72, "/min", 0, ""},
		{"by LOINC", func(in *Input) { in.Metric, in.LOINC = "", "8867-4" }, "heart_rate", 72, "/min", 0, "LOINC:8867-4"},
		{"id and LOINC agree", func(in *Input) { in.LOINC = "8867-4" }, "heart_rate", 72, "/min", 0, "LOINC:8867-4"},
		{"source code kept", func(in *Input) { in.SourceCode = "MDC:147842" }, "heart_rate", 72, "/min", 0, "MDC:147842"},
		{"fahrenheit", func(in *Input) { in.Metric, in.Value, in.Unit = "body_temperature", 101.3, "[degF]" },
			"body_temperature", 38.5, "Cel", converted, ""},
		{"kelvin", func(in *Input) { in.Metric, in.Value, in.Unit = "body_temperature", 310.15, "K" },
			"body_temperature", 37, "Cel", converted, ""},
		{"kPa", func(in *Input) { in.Metric, in.Value, in.Unit = "systolic_bp", 16, "kPa" },
			"systolic_bp", 120.0098521353, "mm[Hg]", converted, ""},
		{"fraction", func(in *Input) { in.Metric, in.Value, in.Unit = "spo2", 0.97, "1" },
			"spo2", 97, "%", converted, ""},
		{"fio2 fraction", func(in *Input) { in.Metric, in.Value, in.Unit = "fio2", 0.4, "1" },
			"fio2", 40, "%", converted, ""},
		{"range bound inclusive", func(in *Input) { in.Metric, in.Value, in.Unit = "spo2", 100, "%" },
			"spo2", 100, "%", 0, ""},
		{"backfill flagged", func(in *Input) { in.EventTimeMs = now - (25 * time.Hour).Milliseconds() },
			"heart_rate", 72, "/min", backfill, ""},
		{"future within skew", func(in *Input) { in.EventTimeMs = now + (5 * time.Minute).Milliseconds() },
			"heart_rate", 72, "/min", 0, ""},
		{"source quality kept", func(in *Input) { in.Quality = uint32(vigilv1.QualityFlag_QUALITY_ARTEFACT) },
			"heart_rate", 72, "/min", uint32(vigilv1.QualityFlag_QUALITY_ARTEFACT), ""},
		{"unicode ids", func(in *Input) { in.Patient = "Zoë Ångström" }, "heart_rate", 72, "/min", 0, ""},
	}
	v := New(catalog.Default(), limits())
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in := good()
			c.mutate(&in)
			var out vigilv1.Sample
			if r := v.Sample(&in, now, &out); r != nil {
				t.Fatalf("refused: %v", r)
			}
			if out.Metric != c.metric || math.Abs(out.Value-c.value) > 1e-6 || out.Unit != c.unit ||
				out.Quality != c.quality || out.SourceCode != c.code {
				t.Errorf("got %s %v %s q=%d code=%q; want %s %v %s q=%d code=%q", out.Metric, out.Value, out.Unit,
					out.Quality, out.SourceCode, c.metric, c.value, c.unit, c.quality, c.code)
			}
			if out.EventTimeMs != in.EventTimeMs || out.Sequence != 17 || out.Channel != "ecg-1" {
				t.Errorf("time/seq/channel not carried: %v", &out)
			}
		})
	}
}

func TestSampleRefused(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*Input)
		reason Reason
		field  string
		says   string
	}{
		{"no tenant", func(in *Input) { in.Tenant = "" }, MissingField, FieldTenant, "no tenant"},
		{"slash in tenant", func(in *Input) { in.Tenant = "a/b" }, InvalidID, FieldTenant, "'/'"},
		{"long tenant", func(in *Input) { in.Tenant = strings.Repeat("t", MaxTenantLen+1) }, InvalidID, FieldTenant, "at most 64"},
		{"no patient", func(in *Input) { in.Patient = "" }, MissingField, FieldPatient, "no patient"},
		{"control char in patient", func(in *Input) { in.Patient = "p\n1" }, InvalidID, FieldPatient, "control character"},
		{"C1 control in patient", func(in *Input) { in.Patient = "p\u00851" }, InvalidID, FieldPatient, "control character"},
		{"bad utf8 in patient", func(in *Input) { in.Patient = "p\xff1" }, InvalidID, FieldPatient, "UTF-8"},
		{"spaces around device", func(in *Input) { in.Device = " bed" }, InvalidID, FieldDevice, "spaces"},
		{"no device", func(in *Input) { in.Device = "" }, MissingField, FieldDevice, "no device"},
		{"long channel", func(in *Input) { in.Channel = strings.Repeat("c", MaxChannelLen+1) }, InvalidID, FieldChannel, "at most"},
		{"no metric", func(in *Input) { in.Metric = "" }, MissingField, FieldMetric, "no metric"},
		{"unknown metric", func(in *Input) { in.Metric = "mood" }, UnknownMetric, FieldMetric, `"mood"`},
		{"unknown LOINC", func(in *Input) { in.Metric, in.LOINC = "", "0000-0" }, UnknownMetric, FieldLOINC, "0000-0"},
		{"id and LOINC disagree", func(in *Input) { in.LOINC = "59408-5" }, MetricMismatch, FieldLOINC, "spo2"},
		{"no value", func(in *Input) { in.HasValue = false }, MissingField, FieldValue, "no value"},
		{"NaN", func(in *Input) { in.Value = math.NaN() }, NotFinite, FieldValue, "finite"},
		{"Inf", func(in *Input) { in.Value = math.Inf(1) }, NotFinite, FieldValue, "finite"},
		{"overflow on conversion", func(in *Input) { in.Unit, in.Value = "/s", math.MaxFloat64 }, NotFinite, FieldValue, "finite"},
		{"bad unit", func(in *Input) { in.Unit = "mm[Hg]" }, UnitNotConvertible, FieldUnit, `"mm[Hg]"`},
		{"too high", func(in *Input) { in.Value = 900 }, OutOfRange, FieldValue, "900"},
		{"negative", func(in *Input) { in.Value = -1 }, OutOfRange, FieldValue, "-1"},
		{"range after conversion", func(in *Input) { in.Metric, in.Value, in.Unit = "body_temperature", 50, "[degF]" },
			OutOfRange, FieldValue, "10 Cel"},
		{"fraction read as percent would pass, as fraction it does not", func(in *Input) { in.Metric, in.Value, in.Unit = "spo2", 97, "1" },
			OutOfRange, FieldValue, "9700"},
		{"no time", func(in *Input) { in.HasTime = false }, MissingField, FieldTime, "no event time"},
		{"before epoch", func(in *Input) { in.EventTimeMs = -5 }, InvalidTime, FieldTime, "epoch"},
		{"future", func(in *Input) { in.EventTimeMs = now + (5 * time.Minute).Milliseconds() + 1 }, FutureTime, FieldTime, "ahead"},
		{"too old", func(in *Input) { in.EventTimeMs = now - (31 * 24 * time.Hour).Milliseconds() }, TooOld, FieldTime, "old"},
	}
	v := New(catalog.Default(), limits())
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in := good()
			c.mutate(&in)
			var out vigilv1.Sample
			r := v.Sample(&in, now, &out)
			if r == nil {
				t.Fatalf("accepted: %v", &out)
			}
			if r.Reason != c.reason || r.Field != c.field || !strings.Contains(r.Message, c.says) {
				t.Errorf("got %s %s %q; want %s %s containing %q", r.Reason, r.Field, r.Message, c.reason, c.field, c.says)
			}
			if !strings.Contains(r.Error(), string(c.reason)) {
				t.Errorf("Error() %q does not carry the reason", r.Error())
			}
		})
	}
}

func TestNoMaxAgeMeansNoLimit(t *testing.T) {
	v := New(catalog.Default(), Limits{MaxFutureSkew: time.Minute, BackfillAge: time.Hour})
	in := good()
	in.EventTimeMs = 0 // 1970
	var out vigilv1.Sample
	if r := v.Sample(&in, now, &out); r != nil {
		t.Fatalf("refused with no max age: %v", r)
	}
	if out.Quality&uint32(vigilv1.QualityFlag_QUALITY_BACKFILL) == 0 {
		t.Errorf("old sample not flagged backfill")
	}
}

func TestReasonsAreSnakeCaseAndUnique(t *testing.T) {
	seen := map[Reason]bool{}
	for _, r := range Reasons() {
		if seen[r] {
			t.Errorf("duplicate reason %s", r)
		}
		seen[r] = true
		for _, c := range r {
			if (c < 'a' || c > 'z') && c != '_' {
				t.Errorf("reason %q is not snake_case", r)
			}
		}
	}
}

func TestSampleDoesNotAllocate(t *testing.T) {
	v := New(catalog.Default(), limits())
	in := good()
	in.Metric, in.Value, in.Unit = "body_temperature", 101.3, "[degF]"
	var out vigilv1.Sample
	allocs := testing.AllocsPerRun(100, func() {
		if r := v.Sample(&in, now, &out); r != nil {
			t.Fatal(r)
		}
	})
	if allocs != 0 {
		t.Errorf("Sample allocates %v times per accepted sample", allocs)
	}
}
