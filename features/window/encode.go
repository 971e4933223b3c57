package window

import (
	"math"
	"slices"

	"github.com/apache/arrow/go/v17/arrow/array"
	"google.golang.org/protobuf/encoding/protowire"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// AppendFeatureWindow appends the protobuf encoding of fw to b and returns
// the extended slice: the bytes proto.MarshalOptions{Deterministic: true}
// gives (fields in number order, proto3 zero values left out, derived
// entries sorted by key), except that unknown fields are not written.
//
// Hand-written on protowire because marshalling the feature windows with
// proto.Marshal was a fifth of the stream stage's CPU in
// BenchmarkStreamEndToEnd; this encoder sizes and writes the messages
// directly and allocates nothing when b has room (and nothing else but
// the key order of a derived map with more than 8 entries).
// TestAppendFeatureWindowMatchesProto compares it with proto.Marshal over
// every field, so a field added to features.proto and not here fails it.
// It reads fw only and is safe for concurrent use on different b.
func AppendFeatureWindow(b []byte, fw *vigilv1.FeatureWindow) []byte {
	b = appendVarintField(b, 1, uint64(fw.GetSchemaVersion()))
	b = appendStringField(b, 2, fw.GetTenant())
	b = appendStringField(b, 3, fw.GetPatient())
	b = appendVarintField(b, 4, uint64(int64(fw.GetKind())))
	b = appendVarintField(b, 5, uint64(fw.GetSizeMs()))
	b = appendVarintField(b, 6, uint64(fw.GetStepMs()))
	b = appendVarintField(b, 7, uint64(fw.GetStartMs()))
	b = appendVarintField(b, 8, uint64(fw.GetEndMs()))
	b = appendVarintField(b, 9, uint64(fw.GetVersion()))
	for _, f := range fw.GetFeatures() {
		b = appendFeature(b, f)
	}
	b = appendVarintField(b, 11, uint64(fw.GetEmittedTimeMs()))
	b = appendVarintField(b, 12, uint64(fw.GetWatermarkMs()))
	b = appendStringField(b, 13, fw.GetWindow())
	return b
}

func appendVarintField(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

func appendStringField(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// zeroDouble: proto3 leaves out +0 (not -0).
func zeroDouble(v float64) bool { return v == 0 && !math.Signbit(v) }

func appendDoubleField(b []byte, num protowire.Number, v float64) []byte {
	if zeroDouble(v) {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.Fixed64Type)
	return protowire.AppendFixed64(b, math.Float64bits(v))
}

func sizeVarintField(num protowire.Number, v uint64) int {
	if v == 0 {
		return 0
	}
	return protowire.SizeTag(num) + protowire.SizeVarint(v)
}

func sizeStringField(num protowire.Number, s string) int {
	if s == "" {
		return 0
	}
	return protowire.SizeTag(num) + protowire.SizeBytes(len(s))
}

func sizeDoubleField(num protowire.Number, v float64) int {
	if zeroDouble(v) {
		return 0
	}
	return protowire.SizeTag(num) + 8
}

// sizeEntry is the size of one derived map entry (key and value always
// written, as proto.Marshal does for map entries).
func sizeEntry(k string) int {
	return protowire.SizeTag(1) + protowire.SizeBytes(len(k)) + protowire.SizeTag(2) + 8
}

// featureRow is one Feature's fields, from a message or from a record's
// row; dk and dv are the derived entries sorted by key.
type featureRow struct {
	metric, unit              string
	count                     uint64
	mean, min, max, std, last float64
	lastTime                  int64
	slope, median, p05, p95   float64
	firstTime                 int64
	completeness, p25, p75    float64
	sinceLast                 int64
	derivedMetric             bool
	dk                        []string
	dv                        []float64
}

func rowOf(f *vigilv1.Feature, dk []string, dv []float64) featureRow {
	for k := range f.GetDerived() {
		dk = append(dk, k)
	}
	slices.Sort(dk)
	for _, k := range dk {
		dv = append(dv, f.GetDerived()[k])
	}
	return featureRow{metric: f.GetMetric(), unit: f.GetUnit(), count: f.GetCount(), mean: f.GetMean(), min: f.GetMin(),
		max: f.GetMax(), std: f.GetStd(), last: f.GetLast(), lastTime: f.GetLastTimeMs(), slope: f.GetSlopePerMin(),
		median: f.GetMedian(), p05: f.GetP05(), p95: f.GetP95(), firstTime: f.GetFirstTimeMs(),
		completeness: f.GetCompleteness(), p25: f.GetP25(), p75: f.GetP75(), sinceLast: f.GetSinceLastMs(),
		derivedMetric: f.GetDerivedMetric(), dk: dk, dv: dv}
}

func sizeRow(f *featureRow) int {
	n := sizeStringField(1, f.metric) + sizeStringField(2, f.unit) + sizeVarintField(3, f.count) +
		sizeDoubleField(4, f.mean) + sizeDoubleField(5, f.min) + sizeDoubleField(6, f.max) +
		sizeDoubleField(7, f.std) + sizeDoubleField(8, f.last) + sizeVarintField(9, uint64(f.lastTime)) +
		sizeDoubleField(10, f.slope) + sizeDoubleField(11, f.median) + sizeDoubleField(12, f.p05) +
		sizeDoubleField(13, f.p95) + sizeVarintField(14, uint64(f.firstTime)) +
		sizeDoubleField(15, f.completeness) + sizeDoubleField(17, f.p25) + sizeDoubleField(18, f.p75) +
		sizeVarintField(19, uint64(f.sinceLast))
	for _, k := range f.dk {
		n += protowire.SizeTag(16) + protowire.SizeBytes(sizeEntry(k))
	}
	if f.derivedMetric {
		n += protowire.SizeTag(20) + 1
	}
	return n
}

func appendRowFields(b []byte, f *featureRow) []byte {
	b = appendStringField(b, 1, f.metric)
	b = appendStringField(b, 2, f.unit)
	b = appendVarintField(b, 3, f.count)
	b = appendDoubleField(b, 4, f.mean)
	b = appendDoubleField(b, 5, f.min)
	b = appendDoubleField(b, 6, f.max)
	b = appendDoubleField(b, 7, f.std)
	b = appendDoubleField(b, 8, f.last)
	b = appendVarintField(b, 9, uint64(f.lastTime))
	b = appendDoubleField(b, 10, f.slope)
	b = appendDoubleField(b, 11, f.median)
	b = appendDoubleField(b, 12, f.p05)
	b = appendDoubleField(b, 13, f.p95)
	b = appendVarintField(b, 14, uint64(f.firstTime))
	b = appendDoubleField(b, 15, f.completeness)
	for i, k := range f.dk {
		b = protowire.AppendTag(b, 16, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(sizeEntry(k)))
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendString(b, k)
		b = protowire.AppendTag(b, 2, protowire.Fixed64Type)
		b = protowire.AppendFixed64(b, math.Float64bits(f.dv[i]))
	}
	b = appendDoubleField(b, 17, f.p25)
	b = appendDoubleField(b, 18, f.p75)
	b = appendVarintField(b, 19, uint64(f.sinceLast))
	if f.derivedMetric {
		b = protowire.AppendTag(b, 20, protowire.VarintType)
		b = append(b, 1)
	}
	return b
}

func appendFeature(b []byte, f *vigilv1.Feature) []byte {
	var kb [8]string
	var vb [8]float64
	r := rowOf(f, kb[:0], vb[:0])
	b = protowire.AppendTag(b, 10, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(sizeRow(&r)))
	return appendRowFields(b, &r)
}

// AppendWindowRows appends to b the protobuf encoding of the FeatureWindow
// of rows [lo, hi) of the record whose columns c are (one window: its
// header is read from row lo), with emitted time emittedMs: the bytes
// AppendFeatureWindow gives for what ToProto makes of those rows
// (TestAppendWindowRowsMatchesToProto), without making the messages. The
// record's derived keys must be unique and sorted within a row, as a
// Batch appends them.
func AppendWindowRows(b []byte, c *Columns, lo, hi int, emittedMs int64) []byte {
	b = appendVarintField(b, 1, 1)
	b = appendStringField(b, 2, c.Tenant.Value(lo))
	b = appendStringField(b, 3, c.Patient.Value(lo))
	b = appendVarintField(b, 4, uint64(int64(c.Kind.Value(lo))))
	b = appendVarintField(b, 5, uint64(c.SizeMs.Value(lo)))
	b = appendVarintField(b, 6, uint64(c.StepMs.Value(lo)))
	b = appendVarintField(b, 7, uint64(c.StartMs.Value(lo)))
	b = appendVarintField(b, 8, uint64(c.EndMs.Value(lo)))
	b = appendVarintField(b, 9, uint64(c.Version.Value(lo)))
	keys := c.Derived.Keys().(*array.String)
	items := c.Derived.Items().(*array.Float64)
	var kb [8]string
	var vb [8]float64
	for i := lo; i < hi; i++ {
		r := featureRow{metric: c.Metric.Value(i), unit: c.Unit.Value(i), count: c.Count.Value(i), mean: c.Mean.Value(i),
			min: c.Min.Value(i), max: c.Max.Value(i), std: c.Std.Value(i), last: c.Last.Value(i),
			lastTime: c.LastTimeMs.Value(i), slope: c.Slope.Value(i), median: c.Median.Value(i),
			p05: c.P05.Value(i), p95: c.P95.Value(i), firstTime: c.FirstTimeMs.Value(i),
			completeness: c.Completeness.Value(i), p25: c.P25.Value(i), p75: c.P75.Value(i),
			sinceLast: c.SinceLastMs.Value(i), derivedMetric: c.DerivedMetric.Value(i), dk: kb[:0], dv: vb[:0]}
		dlo, dhi := c.Derived.ValueOffsets(i)
		for j := dlo; j < dhi; j++ {
			r.dk = append(r.dk, keys.Value(int(j)))
			r.dv = append(r.dv, items.Value(int(j)))
		}
		b = protowire.AppendTag(b, 10, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(sizeRow(&r)))
		b = appendRowFields(b, &r)
	}
	b = appendVarintField(b, 11, uint64(emittedMs))
	b = appendVarintField(b, 12, uint64(c.WatermarkMs.Value(lo)))
	b = appendStringField(b, 13, c.Window.Value(lo))
	return b
}
