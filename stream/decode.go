package stream

import (
	"errors"
	"math"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// maxInterned bounds a batchDecoder's string table; when full it is
// emptied (and refilled by the strings that follow).
const maxInterned = 1 << 15

var (
	errInvalidUTF8 = errors.New("string field contains invalid UTF-8")
	errFieldNumber = errors.New("invalid field number")
)

// batchDecoder decodes SampleBatch record values into one reused message.
//
// Hand-written on protowire because proto.Unmarshal was a tenth of the
// stage's CPU in BenchmarkStreamEndToEnd: it allocates every Sample and
// every string of every record (tenant, patient, metric and unit repeat
// from record to record). This decoder reuses the Samples and interns the
// strings in a bounded table. It accepts what proto.Unmarshal accepts and
// gives an equal message, except that unknown fields are dropped rather
// than kept (TestDecodeBatchMatchesProto and FuzzDecodeBatch compare the
// two, including every field the schema has, so a field added to
// samples.proto and not here fails them).
//
// A batchDecoder is not safe for concurrent use. The message it fills,
// and the Samples in it, are valid until the next decode.
type batchDecoder struct {
	samples []*vigilv1.Sample
	strs    map[string]string
	// recent holds, per string field of the batch and of the first
	// recentSamples samples, the string it had in the previous record: a
	// comparison with it finds the interned string without hashing, as
	// consecutive records mostly repeat tenant, device and the metrics in
	// the same order (a map lookup per string was 4% of the stage's CPU).
	recent [recentSlots]string
	// patient, when not empty, is the caller's guess of the batch's
	// patient id (the id of the patient its record key names, found with
	// the one map lookup per record the caller makes anyway): a patient
	// field equal to it takes it without hashing. It must be valid UTF-8.
	patient string
	// warm keeps the result of the caller's patient.warm, so that its
	// reads are not dropped; its value means nothing.
	warm uint64
}

// recentSamples is the number of leading samples of a batch whose strings
// have recent slots; recentSlots the size of the table: 10 slots for the
// batch's field numbers, then 4 per sample (metric, unit, source code,
// channel).
const (
	recentSamples = 16
	recentSlots   = 10 + 4*recentSamples
)

// sampleSlot is the recent slot of the k-th string field of sample i, or
// -1 when there is none.
func sampleSlot(i, k int) int {
	if i >= recentSamples {
		return -1
	}
	return 10 + 4*i + k
}

// decode replaces b's content with the SampleBatch encoded in v.
func (d *batchDecoder) decode(v []byte, b *vigilv1.SampleBatch) error {
	b.Reset()
	n := 0
	for len(v) > 0 {
		num, typ, l := protowire.ConsumeTag(v)
		if l < 0 {
			return protowire.ParseError(l)
		}
		if num > protowire.MaxValidNumber {
			return errFieldNumber
		}
		v = v[l:]
		var err error
		switch {
		case typ == protowire.VarintType && (num == 1 || num == 5 || num == 6):
			var x uint64
			x, l = protowire.ConsumeVarint(v)
			switch num {
			case 1:
				b.SchemaVersion = uint32(x)
			case 5:
				b.Source = vigilv1.Source(int32(x))
			case 6:
				b.IngestTimeMs = int64(x)
			}
		case typ == protowire.BytesType && num == 8:
			var sub []byte
			if sub, l = protowire.ConsumeBytes(v); l >= 0 {
				if n == len(d.samples) {
					d.samples = append(d.samples, &vigilv1.Sample{})
				}
				s := d.samples[n]
				n++
				s.Reset()
				err = d.decodeSample(sub, s, n-1)
			}
		case typ == protowire.BytesType && (num == 2 || num == 3 || num == 4 || num == 7 || num == 9):
			var sub []byte
			if sub, l = protowire.ConsumeBytes(v); l >= 0 {
				var str string
				if num == 3 && d.patient != "" && string(sub) == d.patient {
					str = d.patient // valid UTF-8: the caller's guess is
				} else {
					str, err = d.str(sub, int(num))
				}
				if err == nil {
					switch num {
					case 2:
						b.Tenant = str
					case 3:
						b.Patient = str
					case 4:
						b.Device = str
					case 7:
						b.MessageId = str
					case 9:
						b.Location = str
					}
				}
			}
		case typ == protowire.BytesType && num == 20:
			// An alert command (rare: decoded with proto, allocating).
			var sub []byte
			if sub, l = protowire.ConsumeBytes(v); l >= 0 {
				if b.AlertCommand == nil {
					b.AlertCommand = &vigilv1.AlertCommand{}
				}
				err = proto.UnmarshalOptions{Merge: true, DiscardUnknown: true}.Unmarshal(sub, b.AlertCommand)
			}
		default:
			l = protowire.ConsumeFieldValue(num, typ, v)
		}
		if l < 0 {
			return protowire.ParseError(l)
		}
		if err != nil {
			return err
		}
		v = v[l:]
	}
	if n > 0 {
		b.Samples = d.samples[:n:n]
	}
	return nil
}

func (d *batchDecoder) decodeSample(v []byte, s *vigilv1.Sample, idx int) error {
	for len(v) > 0 {
		num, typ, l := protowire.ConsumeTag(v)
		if l < 0 {
			return protowire.ParseError(l)
		}
		if num > protowire.MaxValidNumber {
			return errFieldNumber
		}
		v = v[l:]
		var err error
		switch {
		case typ == protowire.Fixed64Type && num == 2:
			var x uint64
			x, l = protowire.ConsumeFixed64(v)
			s.Value = math.Float64frombits(x)
		case typ == protowire.VarintType && (num == 4 || num == 5 || num == 6):
			var x uint64
			x, l = protowire.ConsumeVarint(v)
			switch num {
			case 4:
				s.EventTimeMs = int64(x)
			case 5:
				s.Sequence = x
			case 6:
				s.Quality = uint32(x)
			}
		case typ == protowire.BytesType && (num == 1 || num == 3 || num == 7 || num == 8):
			var sub []byte
			if sub, l = protowire.ConsumeBytes(v); l >= 0 {
				var str string
				slot := -1
				switch num {
				case 1:
					slot = sampleSlot(idx, 0)
				case 3:
					slot = sampleSlot(idx, 1)
				case 7:
					slot = sampleSlot(idx, 2)
				case 8:
					slot = sampleSlot(idx, 3)
				}
				if str, err = d.str(sub, slot); err == nil {
					switch num {
					case 1:
						s.Metric = str
					case 3:
						s.Unit = str
					case 7:
						s.SourceCode = str
					case 8:
						s.Channel = str
					}
				}
			}
		default:
			l = protowire.ConsumeFieldValue(num, typ, v)
		}
		if l < 0 {
			return protowire.ParseError(l)
		}
		if err != nil {
			return err
		}
		v = v[l:]
	}
	return nil
}

// str returns b as an interned string, checking that it is UTF-8 as
// proto3 requires; slot (-1: none) is its recent slot.
func (d *batchDecoder) str(b []byte, slot int) (string, error) {
	if len(b) == 0 {
		return "", nil
	}
	if slot >= 0 && d.recent[slot] == string(b) {
		return d.recent[slot], nil // valid UTF-8: it was checked when interned
	}
	if s, ok := d.strs[string(b)]; ok {
		if slot >= 0 {
			d.recent[slot] = s
		}
		return s, nil
	}
	if !utf8.Valid(b) {
		return "", errInvalidUTF8
	}
	if d.strs == nil || len(d.strs) >= maxInterned {
		d.strs = make(map[string]string, 256)
	}
	s := string(b)
	d.strs[s] = s
	if slot >= 0 {
		d.recent[slot] = s
	}
	return s, nil
}
