package config

// Detectors configures what the stream engine computes from a patient's
// samples besides windows: the early-warning scores (tables as versioned data
// files), per-patient baselines and drift, and ONNX models. Each part lives in
// its own file of this package.
type Detectors struct {
	// Baselines configures per-patient baselines and drift.
	Baselines DetectorsBaselines `yaml:"baselines"`
	// Models configures the ONNX models the stream engine runs.
	Models DetectorsModels `yaml:"models"`
	// Scores configures the early-warning score tables.
	Scores DetectorsScores `yaml:"scores"`
}

func defaultDetectors() Detectors {
	return Detectors{
		Baselines: defaultDetectorsBaselines(),
		Models:    defaultDetectorsModels(),
		Scores:    defaultDetectorsScores(),
	}
}

func (c Detectors) validate(bad func(field, format string, args ...any)) {
	c.Baselines.validate(bad)
	c.Models.validate(bad)
	c.Scores.validate(bad)
}
