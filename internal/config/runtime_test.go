package config

import (
	"runtime/debug"
	"strings"
	"testing"
)

// TestRuntimeSettings: runtime.* load from env and --set, bad values are
// refused naming the field, and Apply sets the collector's target and
// memory limit and puts them back.
func TestRuntimeSettings(t *testing.T) {
	cfg, err := Load("", []string{"VIGIL_RUNTIME_GC_PERCENT=250"}, []string{"runtime.memory_limit=1073741824"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Runtime.GCPercent != 250 || cfg.Runtime.MemoryLimit != 1<<30 {
		t.Fatalf("runtime = %+v, want gc_percent 250 and memory_limit 1 GiB", cfg.Runtime)
	}
	if Default().Runtime.GCPercent != 300 {
		t.Fatalf("default runtime.gc_percent = %d, want 300", Default().Runtime.GCPercent)
	}
	for set, field := range map[string]string{"runtime.gc_percent=-2": "runtime.gc_percent", "runtime.gc_percent=-1": "runtime.gc_percent",
		"runtime.memory_limit=-5": "runtime.memory_limit"} {
		if _, err := Load("", nil, []string{set}); err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("--set %s: error %v, want one naming %s", set, err, field)
		}
	}

	gc0 := debug.SetGCPercent(100)
	debug.SetGCPercent(gc0)
	limit0 := debug.SetMemoryLimit(-1)
	undo := cfg.Runtime.Apply()
	gc := debug.SetGCPercent(-1)
	debug.SetGCPercent(gc)
	limit := debug.SetMemoryLimit(-1)
	undo()
	if gc != 250 || limit != 1<<30 {
		t.Errorf("after Apply: GC percent %d, memory limit %d; want 250 and %d", gc, limit, 1<<30)
	}
	gc = debug.SetGCPercent(-1)
	debug.SetGCPercent(gc)
	if gc != gc0 || debug.SetMemoryLimit(-1) != limit0 {
		t.Errorf("undo left GC percent %d (was %d), memory limit %d (was %d)", gc, gc0, debug.SetMemoryLimit(-1), limit0)
	}
	// 0 leaves the runtime's settings alone.
	Runtime{}.Apply()()
	if g := debug.SetGCPercent(-1); g != gc0 {
		t.Errorf("Runtime{}.Apply changed the GC percent to %d, was %d", g, gc0)
	}
	debug.SetGCPercent(gc0)
}
