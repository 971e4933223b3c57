package config

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// DetectorsBaselines configures the per-patient baselines (package
// detectors/baseline): for each listed metric a rolling robust baseline
// (median and MAD of its 1-minute window means over span, kept as span/step
// bucket medians), the robust z of every window mean against it, and slow
// drift of its daily means (EWMA and two-sided CUSUM against the patient's
// reference). The stream engine emits a "baseline" score when a patient's
// deviation band or drift state changes.
type DetectorsBaselines struct {
	// Metrics are the catalogue metrics that get baselines; empty disables
	// baselines (metrics not listed cost nothing).
	Metrics []string `yaml:"metrics"`
	// Span is how far back the rolling baseline reaches.
	Span time.Duration `yaml:"span"`
	// Step is the bucket size of the baseline: each bucket keeps the median
	// of its window means; span must be a whole multiple (at most 1024
	// buckets, and at most 255 score windows per step).
	Step time.Duration `yaml:"step"`
	// WarmUp is how much of the span the patient's buckets must cover before
	// deviations are scored.
	WarmUp time.Duration `yaml:"warm_up"`
	// Smoothing is how many of a metric's newest window means (1 to 8) the
	// scored value is the median of: the baseline is of step medians, and
	// one noisy minute should not flip the band (a step change shows after
	// half of them).
	Smoothing int `yaml:"smoothing"`
	// MediumZ is the |robust z| of the medium band.
	MediumZ float64 `yaml:"medium_z"`
	// HighZ is the |robust z| of the high band.
	HighZ float64 `yaml:"high_z"`
	// Hysteresis is how far below a band's threshold |z| must fall to leave
	// the band (so that a value near a threshold does not flap).
	Hysteresis float64 `yaml:"hysteresis"`
	// MADFloors is the smallest MAD per metric (in its canonical unit) used
	// in z = (x - median) / (1.4826 * MAD): the baseline's MAD measures how
	// the patient's level moved over the span, and a flat day must not make
	// small changes look large. Every listed metric needs one.
	MADFloors map[string]float64 `yaml:"mad_floors"`
	// EWMALambda is the weight of a new daily mean in the drift EWMA.
	EWMALambda float64 `yaml:"ewma_lambda"`
	// CUSUMK is the CUSUM allowance, in reference-SD units of the daily
	// means.
	CUSUMK float64 `yaml:"cusum_k"`
	// CUSUMH is the CUSUM decision interval (reference-SD units): a drift is
	// reported when a side reaches it. The defaults (k 1.25, h 6, 14
	// reference days) find a +1 mmHg/day systolic creep in home readings
	// (two a day, SD 8) in about 14 days with about 3% false drifts in 90
	// stable days.
	CUSUMH float64 `yaml:"cusum_h"`
	// ReferenceDays is how many daily means establish a patient's drift
	// reference (mean and SD) before drift is evaluated.
	ReferenceDays int `yaml:"reference_days"`
	// SDFloors is the smallest reference SD of the daily means per metric
	// (canonical unit). Every listed metric needs one.
	SDFloors map[string]float64 `yaml:"sd_floors"`
	// References are configured drift references per metric ({mean, sd},
	// e.g. a target blood pressure) used instead of the patient's first
	// reference_days.
	References map[string]BaselineReference `yaml:"references"`
}

// BaselineReference is a configured drift reference of one metric.
type BaselineReference struct {
	// Mean is the reference level of the daily means.
	Mean float64 `yaml:"mean"`
	// SD is the reference SD of the daily means (above 0).
	SD float64 `yaml:"sd"`
}

func defaultDetectorsBaselines() DetectorsBaselines {
	return DetectorsBaselines{
		Metrics: []string{"heart_rate", "spo2", "respiratory_rate", "body_temperature", "systolic_bp", "diastolic_bp", "glucose", "body_weight"},
		Span:    24 * time.Hour, Step: 10 * time.Minute, WarmUp: 12 * time.Hour,
		Smoothing: 5, MediumZ: 2, HighZ: 3, Hysteresis: 0.5,
		MADFloors: map[string]float64{"heart_rate": 3, "spo2": 1, "respiratory_rate": 1.5, "body_temperature": 0.15,
			"systolic_bp": 5, "diastolic_bp": 3, "mean_arterial_pressure": 4, "glucose": 10, "body_weight": 0.5},
		EWMALambda: 0.2, CUSUMK: 1.25, CUSUMH: 6, ReferenceDays: 14,
		SDFloors: map[string]float64{"heart_rate": 1.5, "spo2": 0.5, "respiratory_rate": 0.75, "body_temperature": 0.1,
			"systolic_bp": 2.5, "diastolic_bp": 1.5, "mean_arterial_pressure": 2, "glucose": 5, "body_weight": 0.25},
	}
}

func (c DetectorsBaselines) validate(bad func(field, format string, args ...any)) {
	const p = "detectors.baselines."
	if len(c.Metrics) == 0 {
		return
	}
	for i, m := range c.Metrics {
		if slices.Contains(c.Metrics[:i], m) {
			bad(fmt.Sprintf(p+"metrics[%d]", i), "%q is listed twice", m)
		}
		if f := c.MADFloors[m]; !(f > 0) || math.IsInf(f, 0) {
			bad(p+"mad_floors."+m, "metric %q needs a MAD floor above 0", m)
		}
		if f := c.SDFloors[m]; !(f > 0) || math.IsInf(f, 0) {
			bad(p+"sd_floors."+m, "metric %q needs an SD floor above 0", m)
		}
	}
	switch {
	case c.Step <= 0 || c.Span < c.Step || c.Span%c.Step != 0:
		bad(p+"span", "%s must be a positive whole multiple of step %s", c.Span, c.Step)
	case c.Span/c.Step > 1024:
		bad(p+"step", "span/step is %d buckets, at most 1024", c.Span/c.Step)
	}
	if c.WarmUp < 0 || c.WarmUp > c.Span {
		bad(p+"warm_up", "%s must be between 0 and span %s", c.WarmUp, c.Span)
	}
	if c.Smoothing < 1 || c.Smoothing > 8 {
		bad(p+"smoothing", "must be between 1 and 8, got %d", c.Smoothing)
	}
	if !(c.MediumZ > 0) {
		bad(p+"medium_z", "must be above 0, got %g", c.MediumZ)
	}
	if !(c.HighZ > c.MediumZ) {
		bad(p+"high_z", "must be above medium_z %g, got %g", c.MediumZ, c.HighZ)
	}
	if !(c.Hysteresis >= 0) || c.Hysteresis >= c.MediumZ {
		bad(p+"hysteresis", "must be at least 0 and below medium_z %g, got %g", c.MediumZ, c.Hysteresis)
	}
	if !(c.EWMALambda > 0 && c.EWMALambda <= 1) {
		bad(p+"ewma_lambda", "must be in (0, 1], got %g", c.EWMALambda)
	}
	if !(c.CUSUMK >= 0) || math.IsInf(c.CUSUMK, 0) {
		bad(p+"cusum_k", "must be at least 0, got %g", c.CUSUMK)
	}
	if !(c.CUSUMH > 0) || math.IsInf(c.CUSUMH, 0) {
		bad(p+"cusum_h", "must be above 0, got %g", c.CUSUMH)
	}
	if c.ReferenceDays < 2 || c.ReferenceDays > 365 {
		bad(p+"reference_days", "must be between 2 and 365, got %d", c.ReferenceDays)
	}
	for m, r := range c.References {
		if !slices.Contains(c.Metrics, m) {
			bad(p+"references."+m, "%q is not in detectors.baselines.metrics", m)
		}
		if !(r.SD > 0) || math.IsInf(r.SD, 0) || math.IsNaN(r.Mean) || math.IsInf(r.Mean, 0) {
			bad(p+"references."+m, "needs a finite mean and an sd above 0, got %+v", r)
		}
	}
}
