package window

import (
	"testing"
	"time"

	"github.com/apache/arrow/go/v17/arrow/memory"
	"google.golang.org/protobuf/proto"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// FuzzParseSpec: a window spec file is operator input; any bytes either
// fail with an error or give a spec that compiles.
func FuzzParseSpec(f *testing.F) {
	f.Add(embeddedSpec)
	f.Add([]byte(hrOnly))
	f.Fuzz(func(t *testing.T, doc []byte) {
		s, err := ParseSpec(doc)
		if err != nil {
			return
		}
		if _, err := Compile(s, Options{}, catInfo); err != nil {
			t.Fatalf("a valid spec does not compile: %v", err)
		}
	})
}

// FuzzFromProto: a changelog record is bytes from Kafka; whatever it
// holds, restoring it fails with an error or gives a patient the engine
// can go on with (add, advance, flush) without panicking.
func FuzzFromProto(f *testing.F) {
	e, err := Compile(DefaultSpec(), Options{OutOfOrderness: 5 * time.Second, AllowedLateness: time.Minute}, catInfo)
	if err != nil {
		f.Fatal(err)
	}
	b := NewBatch(memory.NewGoAllocator())
	defer b.Release()
	// Seed: the state of a patient with every kind of window state.
	p := NewPatient()
	for i := 0; i < 200; i++ {
		for _, m := range []string{"heart_rate", "spo2", "steps", "rr_interval", "systolic_bp"} {
			mi, _ := e.Metric(m)
			e.Add(p, mi, pt0+int64(i)*1000, float64(80+i%7))
		}
		e.Advance(p, b, "t", "p")
	}
	b.NewRecord().Release()
	var ps vigilv1.PatientState
	e.ToProto(p, &ps)
	seed, err := proto.Marshal(&ps)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Fuzz(func(t *testing.T, raw []byte) {
		var ps vigilv1.PatientState
		if proto.Unmarshal(raw, &ps) != nil {
			return
		}
		p, err := e.FromProto(&ps)
		if err != nil {
			return
		}
		hr, _ := e.Metric("heart_rate")
		sp, _ := e.Metric("spo2")
		at := p.MaxEventTime()
		if at == noEvent {
			at = pt0
		}
		e.Add(p, hr, at+1000, 70)
		e.Add(p, sp, at+1000, 95)
		e.Advance(p, b, "t", "p")
		e.Flush(p, b, "t", "p")
		b.NewRecord().Release()
	})
}
