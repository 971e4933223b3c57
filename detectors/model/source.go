package model

// Source is what a model's inputs are computed from: one patient's
// observations as of the scoring time. The stream engine implements it over
// its per-patient state; offline tools implement it over replayed rows.
// Implementations are called from one goroutine at a time.
type Source interface {
	// Latest returns the newest value of a catalogue metric (canonical
	// unit) and its event time, Unix epoch ms; ok is false when the metric
	// was never observed.
	Latest(metric string) (value float64, timeMs int64, ok bool)
	// FirstSampleMs returns the event time of the patient's first sample,
	// Unix epoch ms, or 0 when there is none.
	FirstSampleMs() int64
	// Count returns how many observations of the metric the stay has had.
	Count(metric string) int
}

// msPerHour converts epoch milliseconds to hours.
const msPerHour = 3_600_000.0

// Value is one computed input: the value fed to the model (Fill when
// Missing), and the event time of the observation it came from (0 when
// missing; the scoring time for count: and stay_h).
type Value struct {
	Value   float64
	TimeMs  int64
	Missing bool
}

// Eval computes input i of the manifest from src at scoring time atMs.
// A last:/age_h: value newer than atMs (Source answered for a later time)
// counts as missing, so the value is always "at or before" atMs. count: is
// never missing (0 observations is a value); stay_h is missing when the
// patient has no first sample.
func (m *Manifest) Eval(i int, src Source, atMs int64) Value {
	in := &m.Inputs[i]
	switch in.src.kind {
	case SourceLast, SourceAge:
		v, t, ok := src.Latest(in.src.metric)
		if !ok || t > atMs {
			return Value{Value: in.Fill, Missing: true}
		}
		if in.src.kind == SourceAge {
			v = float64(atMs-t) / msPerHour
		}
		return Value{Value: v, TimeMs: t}
	case SourceStay:
		first := src.FirstSampleMs()
		if first <= 0 || first > atMs {
			return Value{Value: in.Fill, Missing: true}
		}
		return Value{Value: float64(atMs-first) / msPerHour, TimeMs: atMs}
	case SourceCount:
		return Value{Value: float64(src.Count(in.src.metric)), TimeMs: atMs}
	}
	// A hand-built manifest that was never validated.
	return Value{Value: in.Fill, Missing: true}
}

// Vector appends the model's input vector for src at scoring time atMs to
// dst[:0] (one float32 per input, manifest order, missing inputs filled
// with their Fill) and returns it; with cap(dst) >= len(m.Inputs) it does
// not allocate. The manifest must have been validated (ParseManifest).
func (m *Manifest) Vector(dst []float32, src Source, atMs int64) []float32 {
	dst = dst[:0]
	for i := range m.Inputs {
		dst = append(dst, float32(m.Eval(i, src, atMs).Value))
	}
	return dst
}

// Values is Vector with each input's time and missing flag (dst reused
// like Vector's).
func (m *Manifest) Values(dst []Value, src Source, atMs int64) []Value {
	dst = dst[:0]
	for i := range m.Inputs {
		dst = append(dst, m.Eval(i, src, atMs))
	}
	return dst
}
