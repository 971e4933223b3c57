package config

import (
	"fmt"
	"regexp"
	"strings"
)

// DetectorsModels configures the ONNX models the stream engine runs (package
// detectors/model). A model version lives in the registry folder as
// <registry>/<name>/<version>/{manifest.yaml,model.onnx}; the manifest names
// its inputs, output, threshold and the sha256 of model.onnx, which is checked
// when the model is loaded. Each configured model scores a patient at the
// engine's scoring points, one ONNX Runtime run per processed input batch,
// and emits Score kind "model:<name>".
type DetectorsModels struct {
	// Registry is the model registry folder; empty means "models" under
	// data_dir. A relative path is relative to the working directory.
	Registry string `yaml:"registry"`
	// ONNXRuntimeLibrary is the path of libonnxruntime.so.1. Empty looks
	// for .cache/onnxruntime/current/libonnxruntime.so.1 (fetched by `make
	// onnxruntime` from npm onnxruntime-node) relative to the working
	// directory, then to the executable's folder and its parent.
	ONNXRuntimeLibrary string `yaml:"onnxruntime_library"`
	// Run lists the models to run; empty runs none (and the ONNX Runtime is
	// not loaded).
	Run []ModelRef `yaml:"run"`
	// DriftWindow is how many recent observed values per model input the
	// drift index (vigil_model_input_drift_psi) is computed over.
	DriftWindow int `yaml:"drift_window"`
	// IntraOpThreads is ONNX Runtime's intra-op thread count per model.
	IntraOpThreads int `yaml:"intra_op_threads"`
}

// ModelRef names one model version in the registry.
type ModelRef struct {
	// Name is the model name (its registry folder).
	Name string `yaml:"name"`
	// Version is the version folder, or "latest" (or empty) for the
	// version whose manifest has the newest created time.
	Version string `yaml:"version"`
}

func defaultDetectorsModels() DetectorsModels {
	return DetectorsModels{DriftWindow: 1000, IntraOpThreads: 1}
}

var modelNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)

func (c DetectorsModels) validate(bad func(field, format string, args ...any)) {
	seen := map[string]bool{}
	for i, r := range c.Run {
		if !modelNameRE.MatchString(r.Name) {
			bad(fmt.Sprintf("detectors.models.run[%d].name", i), "%q must be 1-64 of [a-z0-9_-]", r.Name)
		}
		if seen[r.Name] {
			bad(fmt.Sprintf("detectors.models.run[%d].name", i), "%q listed twice (one version per model)", r.Name)
		}
		seen[r.Name] = true
		if strings.ContainsAny(r.Version, `/\`) || r.Version == "." || r.Version == ".." {
			bad(fmt.Sprintf("detectors.models.run[%d].version", i), "%q is not a version folder name", r.Version)
		}
	}
	if c.DriftWindow < 10 || c.DriftWindow > 1_000_000 {
		bad("detectors.models.drift_window", "must be between 10 and 1000000, got %d", c.DriftWindow)
	}
	if c.IntraOpThreads < 1 || c.IntraOpThreads > 64 {
		bad("detectors.models.intra_op_threads", "must be between 1 and 64, got %d", c.IntraOpThreads)
	}
}
