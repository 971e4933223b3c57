package stage

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestRegisterIsAllOrNothing(t *testing.T) {
	reg := prometheus.NewRegistry()
	a := prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_a_total", Help: "a"})
	b := prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_b_total", Help: "b"})
	if err := Register(reg, "first metrics", b); err != nil {
		t.Fatal(err)
	}
	// a registers, then b clashes: a must be rolled back.
	b2 := prometheus.NewCounter(prometheus.CounterOpts{Name: "vigil_b_total", Help: "b"})
	err := Register(reg, "second metrics", a, b2)
	if err == nil || !strings.Contains(err.Error(), "registering second metrics") || !strings.Contains(err.Error(), "same registry") {
		t.Fatalf("got %v, want an error naming second metrics and the clash", err)
	}
	if err := reg.Register(a); err != nil {
		t.Errorf("a was left registered after the failure: %v", err)
	}
}
