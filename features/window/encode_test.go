package window

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/apache/arrow/go/v17/arrow/memory"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// fillRandom sets every field of m (found by reflection, so that a field
// added to the schema is covered) to a random value: often the zero value,
// sometimes -0, NaN or a negative number.
func fillRandom(rng *rand.Rand, m protoreflect.Message) {
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		if rng.IntN(4) == 0 {
			continue // zero
		}
		switch {
		case fd.IsMap():
			mp := m.Mutable(fd).Map()
			for range rng.IntN(12) {
				k := []string{"", "a", "hrv_rmssd_ms", "odi_per_h", "wear_time_s", "z", "desat_events", "é"}[rng.IntN(8)] + string(rune('a'+rng.IntN(26)))
				mp.Set(protoreflect.ValueOfString(k).MapKey(), protoreflect.ValueOfFloat64(randFloat(rng)))
			}
		case fd.IsList():
			l := m.Mutable(fd).List()
			for range rng.IntN(5) {
				e := l.NewElement()
				fillRandom(rng, e.Message())
				l.Append(e)
			}
		default:
			m.Set(fd, randScalar(rng, fd))
		}
	}
}

func randFloat(rng *rand.Rand) float64 {
	switch rng.IntN(6) {
	case 0:
		return 0
	case 1:
		return math.Copysign(0, -1)
	case 2:
		return math.NaN()
	}
	return (rng.Float64() - 0.5) * math.Pow(10, float64(rng.IntN(12)))
}

func randScalar(rng *rand.Rand, fd protoreflect.FieldDescriptor) protoreflect.Value {
	big := rng.Int64() >> rng.IntN(63)
	if rng.IntN(3) == 0 {
		big = -big
	}
	switch fd.Kind() {
	case protoreflect.StringKind:
		return protoreflect.ValueOfString([]string{"t", "patient-0001", "1m", "heart_rate", "/min", "mm[Hg]", "ü"}[rng.IntN(7)])
	case protoreflect.DoubleKind:
		return protoreflect.ValueOfFloat64(randFloat(rng))
	case protoreflect.Int64Kind:
		return protoreflect.ValueOfInt64(big)
	case protoreflect.Uint64Kind:
		return protoreflect.ValueOfUint64(uint64(big))
	case protoreflect.Uint32Kind:
		return protoreflect.ValueOfUint32(uint32(big))
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(true)
	case protoreflect.EnumKind:
		return protoreflect.ValueOfEnum(protoreflect.EnumNumber(int32(big)))
	}
	panic("field kind not covered by the test (and maybe not by AppendFeatureWindow): " + fd.Kind().String() + " " + string(fd.FullName()))
}

// TestAppendFeatureWindowMatchesProto: the hand-written encoder gives the
// bytes of deterministic proto.Marshal for random messages with every
// field, and appends to what b holds.
func TestAppendFeatureWindowMatchesProto(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 3000 {
		fw := &vigilv1.FeatureWindow{}
		fillRandom(rng, fw.ProtoReflect())
		want, err := proto.MarshalOptions{Deterministic: true}.Marshal(fw)
		if err != nil {
			t.Fatal(err)
		}
		got := AppendFeatureWindow([]byte("prefix"), fw)
		if !bytes.Equal(got[6:], want) || string(got[:6]) != "prefix" {
			t.Fatalf("message %d: encodings differ\nmessage %v\ngot  %x\nwant %x", i, fw, got[6:], want)
		}
	}
	fw := &vigilv1.FeatureWindow{Tenant: "t", Features: []*vigilv1.Feature{{Metric: "spo2", Mean: 97, Derived: map[string]float64{"odi_per_h": 2, "desat_events": 1}}}}
	buf := make([]byte, 0, 256)
	if n := testing.AllocsPerRun(100, func() { AppendFeatureWindow(buf, fw) }); n != 0 {
		t.Errorf("AppendFeatureWindow allocates %v times into a buffer with room", n)
	}
}

// TestAppendWindowRowsMatchesToProto: encoding a window's rows straight
// from the record gives the bytes of encoding ToProto's message, for
// random rows (every statistic, derived entries, derived metrics) of
// random windows.
func TestAppendWindowRowsMatchesToProto(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 9))
	b := NewBatch(memory.NewGoAllocator())
	defer b.Release()
	metrics := []metric{{name: "heart_rate", unit: "/min"}, {name: "spo2", unit: "%"}, {name: "steps", unit: "1"}, {name: "rr_interval", unit: "ms"}}
	for round := range 200 {
		for w := range 1 + rng.IntN(4) {
			h := rowHeader{tenant: "t", patient: fmt.Sprintf("p-%d", rng.IntN(3)), window: []string{"1m", "5m", "activity"}[rng.IntN(3)],
				kind: vigilv1.WindowKind(rng.IntN(4)), sizeMs: int64(rng.IntN(4)) * 60000, stepMs: int64(rng.IntN(2)) * 60000,
				startMs: int64(round*10+w) * 60000, endMs: int64(round*10+w+1) * 60000, version: uint32(1 + rng.IntN(3)),
				watermarkMs: rng.Int64N(1 << 42)}
			for _, m := range metrics {
				if rng.IntN(3) == 0 {
					continue
				}
				st := Stats{Count: uint64(rng.IntN(100)), Mean: randFloat(rng), Min: randFloat(rng), Max: randFloat(rng), Std: randFloat(rng),
					Last: randFloat(rng), Slope: randFloat(rng), Median: randFloat(rng), P05: randFloat(rng), P25: randFloat(rng),
					P75: randFloat(rng), P95: randFloat(rng), Completeness: randFloat(rng), FirstTime: rng.Int64N(1 << 42),
					LastTime: rng.Int64N(1 << 42), SinceLast: rng.Int64N(100000), HasDesat: rng.IntN(2) == 0, DesatEvents: rng.IntN(5),
					ODI: randFloat(rng), HasWear: rng.IntN(2) == 0, WearS: randFloat(rng), HasHRV: rng.IntN(2) == 0}
				st.HRV.N = rng.IntN(3)
				st.HRV.MeanNN, st.HRV.RMSSD = randFloat(rng), randFloat(rng)
				b.appendRow(&h, &m, &st, false)
			}
			if rng.IntN(2) == 0 {
				b.appendDerived(&h, DerivedPulsePressure, "mm[Hg]", uint64(rng.IntN(9)), randFloat(rng), randFloat(rng))
			}
			b.Seal()
		}
		wins := slices.Clone(b.Windows())
		rec := b.NewRecord()
		fws, err := ToProto(rec, 77)
		if err != nil {
			t.Fatal(err)
		}
		cols, _ := ColumnsOf(rec)
		row, k := 0, 0
		for _, w := range wins {
			want := AppendFeatureWindow(nil, fws[k])
			got := AppendWindowRows(nil, &cols, row, row+w.Rows, 77)
			if !bytes.Equal(got, want) {
				t.Fatalf("round %d window %d: encodings differ\n%v\ngot  %x\nwant %x", round, k, fws[k], got, want)
			}
			row += w.Rows
			k++
		}
		if k != len(fws) {
			t.Fatalf("round %d: %d windows logged, ToProto made %d", round, k, len(fws))
		}
		rec.Release()
	}
}
