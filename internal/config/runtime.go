package config

import "runtime/debug"

// Runtime configures the Go runtime of every vigil command (applied by
// Apply at start-up, before any stage runs).
type Runtime struct {
	// GCPercent is the garbage collector's heap-growth target (what GOGC
	// sets): the heap may grow by this percentage of the live heap
	// between collections. The default, 300, trades memory for CPU: the
	// stream stage allocates per record and spent about a tenth of its CPU
	// in the collector at GOGC's 100 (BenchmarkStreamEndToEnd). 0 leaves
	// the runtime's setting (GOGC, else 100); -1 turns the collector off
	// until memory_limit is reached (memory_limit must then be set).
	GCPercent int `yaml:"gc_percent"`
	// MemoryLimit is a soft limit on the Go runtime's memory, in bytes
	// (what GOMEMLIMIT sets): near it the collector runs as often as it
	// needs to, whatever gc_percent says, so it is the safety net for a
	// high gc_percent on a box with little memory. 0 leaves the runtime's
	// setting (GOMEMLIMIT, else none); set it to about nine tenths of the
	// memory the process may use. The embedded broker keeps its topics in
	// memory, so size it for them in `vigil run`.
	MemoryLimit int64 `yaml:"memory_limit"`
}

func defaultRuntime() Runtime { return Runtime{GCPercent: 300} }

func (c Runtime) validate(bad func(field, format string, args ...any)) {
	if c.GCPercent < -1 {
		bad("runtime.gc_percent", "must be -1 (off), 0 (the runtime's setting) or a percentage, got %d", c.GCPercent)
	}
	if c.MemoryLimit < 0 {
		bad("runtime.memory_limit", "must be 0 (the runtime's setting) or a number of bytes, got %d", c.MemoryLimit)
	}
	if c.GCPercent == -1 && c.MemoryLimit == 0 {
		bad("runtime.gc_percent", "-1 (collector off) needs runtime.memory_limit")
	}
}

// Apply sets the process's garbage-collector target and memory limit
// (runtime/debug) as configured, leaving those configured as 0 alone. The
// settings are process-wide: vigil applies them once at start-up, before
// any stage runs; it is safe to call concurrently with running code. It
// returns a function that puts back the previous settings (for tests and
// benchmarks).
func (c Runtime) Apply() (undo func()) {
	gc, limit := -2, int64(-1)
	if c.GCPercent != 0 {
		gc = debug.SetGCPercent(c.GCPercent)
	}
	if c.MemoryLimit > 0 {
		limit = debug.SetMemoryLimit(c.MemoryLimit)
	}
	return func() {
		if gc != -2 {
			debug.SetGCPercent(gc)
		}
		if limit >= 0 {
			debug.SetMemoryLimit(limit)
		}
	}
}
