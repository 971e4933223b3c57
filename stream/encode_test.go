package stream

import (
	"bytes"
	"math"
	"math/rand/v2"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// fillRandom sets every field of m (found by reflection, so that a field
// added to the schema is covered) to a random value: often the zero value,
// sometimes -0, NaN, negative numbers or empty list elements.
func fillRandom(t *testing.T, rng *rand.Rand, m protoreflect.Message) {
	fields := m.Descriptor().Fields()
	for i := range fields.Len() {
		fd := fields.Get(i)
		if rng.IntN(4) == 0 {
			continue
		}
		switch {
		case fd.IsMap():
			t.Fatalf("map field %s: not covered by the test (nor by the encoder)", fd.FullName())
		case fd.IsList():
			l := m.Mutable(fd).List()
			for range rng.IntN(5) {
				if fd.Kind() == protoreflect.MessageKind {
					e := l.NewElement()
					fillRandom(t, rng, e.Message())
					l.Append(e)
				} else {
					l.Append(randScalar(t, rng, fd))
				}
			}
		default:
			m.Set(fd, randScalar(t, rng, fd))
		}
	}
}

func randScalar(t *testing.T, rng *rand.Rand, fd protoreflect.FieldDescriptor) protoreflect.Value {
	big := rng.Int64() >> rng.IntN(63)
	if rng.IntN(3) == 0 {
		big = -big
	}
	switch fd.Kind() {
	case protoreflect.StringKind:
		return protoreflect.ValueOfString([]string{"", "t", "news2", "respiratory_rate", "Ø", "31-39", "c5e1d2"}[rng.IntN(7)])
	case protoreflect.DoubleKind:
		return protoreflect.ValueOfFloat64([]float64{0, math.Copysign(0, -1), math.NaN(), 3, -2.5, float64(big)}[rng.IntN(6)])
	case protoreflect.Int64Kind:
		return protoreflect.ValueOfInt64(big)
	case protoreflect.Uint32Kind:
		return protoreflect.ValueOfUint32(uint32(big))
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(true)
	}
	t.Fatalf("field kind %s of %s not covered by the test (nor maybe by the encoder)", fd.Kind(), fd.FullName())
	return protoreflect.Value{}
}

// TestAppendScoreMatchesProto: the hand-written encoder gives the bytes of
// deterministic proto.Marshal for random scores with every field, and
// appends to what b holds without allocating.
func TestAppendScoreMatchesProto(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range 3000 {
		s := &vigilv1.Score{}
		fillRandom(t, rng, s.ProtoReflect())
		want, err := proto.MarshalOptions{Deterministic: true}.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		got := appendScore([]byte("prefix"), s)
		if !bytes.Equal(got[6:], want) || string(got[:6]) != "prefix" {
			t.Fatalf("score %d: encodings differ\nscore %v\ngot  %x\nwant %x", i, s, got[6:], want)
		}
	}
	s := &vigilv1.Score{Id: "x", Value: 5, Components: []*vigilv1.ScoreComponent{{Parameter: "pulse", Points: 1}}, Missing: []string{"a"}}
	buf := make([]byte, 0, 256)
	if n := testing.AllocsPerRun(100, func() { appendScore(buf, s) }); n != 0 {
		t.Errorf("appendScore allocates %v times into a buffer with room", n)
	}
}
