package stream

import (
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// fill sets every field of m (recursively, two elements per list) to a
// non-default value, so that a field the hand-written decoder does not
// know shows up as a difference.
func fill(m protoreflect.Message, seed int) {
	fields := m.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		n := seed*100 + i + 1
		val := func() protoreflect.Value {
			switch fd.Kind() {
			case protoreflect.StringKind:
				return protoreflect.ValueOfString(fd.TextName() + "-é-" + string(rune('a'+n%26)))
			case protoreflect.BytesKind:
				return protoreflect.ValueOfBytes([]byte{byte(n), 0, 1})
			case protoreflect.BoolKind:
				return protoreflect.ValueOfBool(true)
			case protoreflect.EnumKind:
				return protoreflect.ValueOfEnum(protoreflect.EnumNumber(1 + n%2))
			case protoreflect.DoubleKind:
				return protoreflect.ValueOfFloat64(float64(n) + 0.25)
			case protoreflect.FloatKind:
				return protoreflect.ValueOfFloat32(float32(n) + 0.5)
			case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
				return protoreflect.ValueOfInt32(int32(-n))
			case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
				return protoreflect.ValueOfInt64(int64(n) << 33)
			case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
				return protoreflect.ValueOfUint32(uint32(n) + 1<<31)
			case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
				return protoreflect.ValueOfUint64(uint64(n) << 40)
			}
			return protoreflect.Value{}
		}
		switch {
		case fd.IsMap():
			panic("SampleBatch has no map field: extend fill")
		case fd.IsList() && fd.Kind() == protoreflect.MessageKind:
			l := m.Mutable(fd).List()
			for j := range 2 {
				e := l.NewElement()
				fill(e.Message(), seed*10+j+1)
				l.Append(e)
			}
		case fd.IsList():
			l := m.Mutable(fd).List()
			l.Append(val())
			l.Append(val())
		case fd.Kind() == protoreflect.MessageKind:
			fill(m.Mutable(fd).Message(), seed+1)
		default:
			m.Set(fd, val())
		}
	}
}

// TestDecodeBatchMatchesProto: the hand-written decoder gives what
// proto.Unmarshal gives for a batch with every field of the schema set,
// also when its buffers are reused for a smaller batch next.
func TestDecodeBatchMatchesProto(t *testing.T) {
	full := &vigilv1.SampleBatch{}
	fill(full.ProtoReflect(), 1)
	small := &vigilv1.SampleBatch{Tenant: "t", Patient: "p", Samples: []*vigilv1.Sample{{Metric: "spo2", Value: 97, EventTimeMs: 5}}}
	var d batchDecoder
	var got vigilv1.SampleBatch
	for _, want := range []*vigilv1.SampleBatch{full, small, full, {}} {
		v, err := proto.Marshal(want)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.decode(v, &got); err != nil {
			t.Fatalf("decode: %v", err)
		}
		if !proto.Equal(&got, want) {
			t.Fatalf("decoded\n%v\nwant\n%v", &got, want)
		}
	}
	// Invalid UTF-8 in a string is refused, as proto.Unmarshal does.
	v, _ := proto.Marshal(&vigilv1.SampleBatch{Tenant: "ok"})
	v = append(v, 0x1a, 2, 0xff, 0xfe) // field 3 (patient), 2 bytes
	if err := proto.Unmarshal(v, &vigilv1.SampleBatch{}); err == nil {
		t.Fatal("proto.Unmarshal accepted invalid UTF-8: the test premise is wrong")
	}
	if err := d.decode(v, &got); err == nil {
		t.Error("invalid UTF-8 accepted")
	}
	// The caller's patient guess changes nothing: right (taken as is),
	// wrong (the field's own value), or a prefix of the invalid bytes.
	for _, guess := range []string{small.Patient, "q", full.Patient, "\xff"} {
		d.patient = guess
		for _, want := range []*vigilv1.SampleBatch{small, full} {
			v, _ := proto.Marshal(want)
			if err := d.decode(v, &got); err != nil || !proto.Equal(&got, want) {
				t.Fatalf("with guess %q: decoded\n%v (%v)\nwant\n%v", guess, &got, err, want)
			}
		}
		if err := d.decode(v, &got); err == nil {
			t.Errorf("with guess %q: invalid UTF-8 accepted", guess)
		}
	}
	d.patient = ""
}

// FuzzDecodeBatch: on any input, the hand-written decoder fails exactly
// when proto.Unmarshal does and otherwise gives an equal message (unknown
// fields aside).
func FuzzDecodeBatch(f *testing.F) {
	full := &vigilv1.SampleBatch{}
	fill(full.ProtoReflect(), 1)
	seeds := append([]*vigilv1.SampleBatch{full}, scenarioBatches("st-mary", "p-001")...)
	seeds = append(seeds, workload(2, 1, 3)[:5]...)
	for _, b := range seeds {
		v, err := proto.Marshal(b)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(v)
	}
	f.Add([]byte{0x42, 0x03, 0x0a, 0x01, 'x'})
	var d batchDecoder
	f.Fuzz(func(t *testing.T, v []byte) {
		var want, got vigilv1.SampleBatch
		werr := proto.UnmarshalOptions{DiscardUnknown: true}.Unmarshal(v, &want)
		gerr := d.decode(v, &got)
		if (werr == nil) != (gerr == nil) {
			t.Fatalf("proto.Unmarshal error %v, decoder error %v", werr, gerr)
		}
		if werr == nil && !proto.Equal(&want, &got) {
			t.Fatalf("decoded\n%v\nproto.Unmarshal\n%v", &got, &want)
		}
	})
}

// TestDecodeSequenceMatchesProto: one decoder, fed a long sequence of
// records whose strings repeat at the same positions or change (patients,
// metric orders, batches of more samples than have recent slots), gives
// what proto.Unmarshal gives for every record.
func TestDecodeSequenceMatchesProto(t *testing.T) {
	batches := workload(7, 3, 5)
	long := &vigilv1.SampleBatch{Tenant: "t2", Patient: "p-long", Device: "d"}
	for i := range recentSamples + 5 {
		long.Samples = append(long.Samples, &vigilv1.Sample{Metric: []string{"heart_rate", "spo2", "steps"}[i%3], Unit: []string{"", "%", "/min"}[i%3], Value: float64(i), Channel: "c"})
	}
	batches = append(batches, long, batches[0], long)
	var d batchDecoder
	var got vigilv1.SampleBatch
	for i, want := range batches {
		v, err := proto.Marshal(want)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.decode(v, &got); err != nil {
			t.Fatalf("record %d: decode: %v", i, err)
		}
		if !proto.Equal(&got, want) {
			t.Fatalf("record %d: decoded\n%v\nwant\n%v", i, &got, want)
		}
	}
}
