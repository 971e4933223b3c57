package config

import "time"

// StreamWindows configures the stream stage's event-time windows (package
// features/window). The patient's watermark is its newest event time minus
// stream.out_of_orderness; a window closes when the watermark passes its end.
type StreamWindows struct {
	// Spec is a window specification file (the format of
	// features/window/spec.yaml: which metrics get which tumbling, hopping
	// and session windows, and the per-metric feature settings). Empty uses
	// the embedded spec: 1-minute tumbling and 5-minute hopping (1-minute
	// step) windows over the vitals and a 10-minute-gap session over steps.
	// It must have a tumbling window of stream.window.
	Spec string `yaml:"spec"`
	// AllowedLateness is how long after a window closed a late sample still
	// goes in: the window is emitted again as a correction with a higher
	// version. A sample later than that (its shortest window closed more
	// than this before the watermark) goes to the dead-letter topic as
	// too_late, counted in vigil_stream_late_samples_total. Window state is
	// kept this much longer.
	AllowedLateness time.Duration `yaml:"allowed_lateness"`
	// IdleTimeout is how long (processing time) a patient may send nothing
	// before its open windows are closed, so that a silent wearable does not
	// hold its windows open forever; its watermark then moves on with
	// processing time. Samples that come later for the closed windows are
	// late (see allowed_lateness). 0 disables it.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// FlushOnShutdown closes every open window when the stream stage stops
	// (as if every patient had gone idle). Off, open windows stay in the
	// changelog and close when their data arrives after the restart.
	FlushOnShutdown bool `yaml:"flush_on_shutdown"`
}

func defaultStreamWindows() StreamWindows {
	return StreamWindows{AllowedLateness: time.Minute, IdleTimeout: 2 * time.Minute}
}

func (c StreamWindows) validate(bad func(field, format string, args ...any)) {
	if c.AllowedLateness < 0 || c.AllowedLateness > 24*time.Hour {
		bad("stream.windows.allowed_lateness", "must be between 0 and 24h, got %s", c.AllowedLateness)
	}
	if c.IdleTimeout < 0 || (c.IdleTimeout > 0 && c.IdleTimeout < time.Second) {
		bad("stream.windows.idle_timeout", "must be 0 (off) or at least 1s, got %s", c.IdleTimeout)
	}
}
