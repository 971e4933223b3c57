package config

// Detectors configures what the stream engine computes from a patient's
// samples besides windows: the early-warning scores (tables as versioned data
// files), per-patient baselines and drift, and ONNX models. Each part lives in
// its own file of this package.
type Detectors struct {
}

func defaultDetectors() Detectors { return Detectors{} }

func (c Detectors) validate(bad func(field, format string, args ...any)) {
}
