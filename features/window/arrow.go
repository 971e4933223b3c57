package window

import (
	"fmt"
	"strings"

	"github.com/apache/arrow/go/v17/arrow"
	"github.com/apache/arrow/go/v17/arrow/array"
	"github.com/apache/arrow/go/v17/arrow/memory"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Column indexes of Schema.
const (
	ColTenant = iota
	ColPatient
	ColWindow
	ColKind
	ColSizeMs
	ColStepMs
	ColStartMs
	ColEndMs
	ColVersion
	ColWatermarkMs
	ColMetric
	ColUnit
	ColDerivedMetric
	ColCount
	ColMean
	ColMin
	ColMax
	ColStd
	ColLast
	ColFirstTimeMs
	ColLastTimeMs
	ColSlopePerMin
	ColMedian
	ColP05
	ColP25
	ColP75
	ColP95
	ColCompleteness
	ColSinceLastMs
	ColDerived
)

// Schema is the Arrow schema of feature record batches: one row per
// (patient, window, metric), rows of one window adjacent, metrics sorted by
// name, derived metrics after them.
var Schema = arrow.NewSchema([]arrow.Field{
	{Name: "tenant", Type: arrow.BinaryTypes.String},
	{Name: "patient", Type: arrow.BinaryTypes.String},
	{Name: "window", Type: arrow.BinaryTypes.String},
	{Name: "kind", Type: arrow.PrimitiveTypes.Int32},
	{Name: "size_ms", Type: arrow.PrimitiveTypes.Int64},
	{Name: "step_ms", Type: arrow.PrimitiveTypes.Int64},
	{Name: "start_ms", Type: arrow.PrimitiveTypes.Int64},
	{Name: "end_ms", Type: arrow.PrimitiveTypes.Int64},
	{Name: "version", Type: arrow.PrimitiveTypes.Uint32},
	{Name: "watermark_ms", Type: arrow.PrimitiveTypes.Int64},
	{Name: "metric", Type: arrow.BinaryTypes.String},
	{Name: "unit", Type: arrow.BinaryTypes.String},
	{Name: "derived_metric", Type: arrow.FixedWidthTypes.Boolean},
	{Name: "count", Type: arrow.PrimitiveTypes.Uint64},
	{Name: "mean", Type: arrow.PrimitiveTypes.Float64},
	{Name: "min", Type: arrow.PrimitiveTypes.Float64},
	{Name: "max", Type: arrow.PrimitiveTypes.Float64},
	{Name: "std", Type: arrow.PrimitiveTypes.Float64},
	{Name: "last", Type: arrow.PrimitiveTypes.Float64},
	{Name: "first_time_ms", Type: arrow.PrimitiveTypes.Int64},
	{Name: "last_time_ms", Type: arrow.PrimitiveTypes.Int64},
	{Name: "slope_per_min", Type: arrow.PrimitiveTypes.Float64},
	{Name: "median", Type: arrow.PrimitiveTypes.Float64},
	{Name: "p05", Type: arrow.PrimitiveTypes.Float64},
	{Name: "p25", Type: arrow.PrimitiveTypes.Float64},
	{Name: "p75", Type: arrow.PrimitiveTypes.Float64},
	{Name: "p95", Type: arrow.PrimitiveTypes.Float64},
	{Name: "completeness", Type: arrow.PrimitiveTypes.Float64},
	{Name: "since_last_ms", Type: arrow.PrimitiveTypes.Int64},
	{Name: "derived", Type: arrow.MapOf(arrow.BinaryTypes.String, arrow.PrimitiveTypes.Float64)},
}, nil)

type rowHeader struct {
	tenant, patient, window string
	kind                    vigilv1.WindowKind
	sizeMs, stepMs          int64
	startMs, endMs          int64
	version                 uint32
	watermarkMs             int64
}

// Batch collects feature rows and builds Arrow records from them; it also
// holds the engine's scratch space, so that computing features does not
// allocate. A Batch belongs to one goroutine; Release it when done.
type Batch struct {
	rb   *array.RecordBuilder
	pool *bufferPool
	rows int

	str     [4]*array.StringBuilder // tenant patient window metric
	unit    *array.StringBuilder
	kind    *array.Int32Builder
	i64     [9]*array.Int64Builder
	version *array.Uint32Builder
	count   *array.Uint64Builder
	dflag   *array.BooleanBuilder
	f64     [12]*array.Float64Builder
	dmap    *array.MapBuilder
	dkeys   *array.StringBuilder
	dvals   *array.Float64Builder
	wins    []winRef
	log     []WindowRows
	sealed  bool
	// tenant and patient of the last entry of log
	lastTenant, lastPatient string
	strs                    strTable
	stats                   [maxMetrics]Stats
	merged, tmp             []run
	rr                      []float64
}

// NewBatch returns an empty Batch allocating Arrow buffers from mem. The
// buffers of the records it built are kept, once the records are released,
// for its next records (bufferPool), and handed back to mem by Release.
func NewBatch(mem memory.Allocator) *Batch {
	pool := &bufferPool{parent: mem}
	rb := array.NewRecordBuilder(pool, Schema)
	b := &Batch{rb: rb, pool: pool}
	b.str = [4]*array.StringBuilder{rb.Field(ColTenant).(*array.StringBuilder), rb.Field(ColPatient).(*array.StringBuilder),
		rb.Field(ColWindow).(*array.StringBuilder), rb.Field(ColMetric).(*array.StringBuilder)}
	b.unit = rb.Field(ColUnit).(*array.StringBuilder)
	b.kind = rb.Field(ColKind).(*array.Int32Builder)
	for i, c := range []int{ColSizeMs, ColStepMs, ColStartMs, ColEndMs, ColWatermarkMs, ColFirstTimeMs, ColLastTimeMs, ColSinceLastMs} {
		b.i64[i] = rb.Field(c).(*array.Int64Builder)
	}
	b.version = rb.Field(ColVersion).(*array.Uint32Builder)
	b.count = rb.Field(ColCount).(*array.Uint64Builder)
	b.dflag = rb.Field(ColDerivedMetric).(*array.BooleanBuilder)
	for i, c := range []int{ColMean, ColMin, ColMax, ColStd, ColLast, ColSlopePerMin, ColMedian, ColP05, ColP25, ColP75, ColP95, ColCompleteness} {
		b.f64[i] = rb.Field(c).(*array.Float64Builder)
	}
	b.dmap = rb.Field(ColDerived).(*array.MapBuilder)
	b.dkeys = b.dmap.KeyBuilder().(*array.StringBuilder)
	b.dvals = b.dmap.ItemBuilder().(*array.Float64Builder)
	return b
}

// Len returns the rows appended since the last NewRecord.
func (b *Batch) Len() int { return b.rows }

// NewRecord returns the rows appended so far as a record (the caller owns
// it and must Release it) and starts an empty batch.
func (b *Batch) NewRecord() arrow.Record {
	n := b.rows
	b.rows = 0
	clear(b.log)
	b.log = b.log[:0]
	b.sealed = false
	rec := b.rb.NewRecord()
	if n > 0 {
		// Room for a record like this one (up to reserveRows rows) at
		// once, rather than growing every column from 32 rows by doubling.
		b.rb.Reserve(min(n, reserveRows))
	}
	return rec
}

// reserveRows caps the rows NewRecord reserves room for.
const reserveRows = 1024

// WindowRows describes the adjacent rows of one window in a Batch.
type WindowRows struct {
	Window         string
	StartMs, EndMs int64
	Version        uint32
	// Rows is the number of rows.
	Rows int
}

// Windows returns the windows appended since the last NewRecord, in row
// order: adjacent rows with equal tenant, patient, window, start, end and
// version, as ToProto groups them, except that a Seal between two rows
// also separates them. The slice is b's, valid until the next append or
// NewRecord.
func (b *Batch) Windows() []WindowRows { return b.log }

// Seal makes the next row start a new entry of Windows.
func (b *Batch) Seal() { b.sealed = true }

// Release frees the builders and the kept buffers (records still held
// free theirs to the allocator when released). Idempotent.
func (b *Batch) Release() {
	if b.rb != nil {
		b.rb.Release()
		b.rb = nil
		b.pool.drain()
	}
}

// logRow counts a row of header h in Windows.
func (b *Batch) logRow(h *rowHeader) {
	if n := len(b.log); n > 0 && !b.sealed && b.lastTenant == h.tenant && b.lastPatient == h.patient {
		if l := &b.log[n-1]; l.Window == h.window && l.StartMs == h.startMs && l.EndMs == h.endMs && l.Version == h.version {
			l.Rows++
			return
		}
	}
	b.log = append(b.log, WindowRows{Window: h.window, StartMs: h.startMs, EndMs: h.endMs, Version: h.version, Rows: 1})
	b.lastTenant, b.lastPatient, b.sealed = h.tenant, h.patient, false
}

func (b *Batch) header(h *rowHeader) {
	b.rows++
	b.logRow(h)
	b.str[0].Append(h.tenant)
	b.str[1].Append(h.patient)
	b.str[2].Append(h.window)
	b.kind.Append(int32(h.kind))
	b.i64[0].Append(h.sizeMs)
	b.i64[1].Append(h.stepMs)
	b.i64[2].Append(h.startMs)
	b.i64[3].Append(h.endMs)
	b.i64[4].Append(h.watermarkMs)
	b.version.Append(h.version)
}

func (b *Batch) appendRow(h *rowHeader, m *metric, st *Stats, _ bool) {
	b.header(h)
	b.str[3].Append(m.name)
	b.unit.Append(m.unit)
	b.dflag.Append(false)
	b.count.Append(st.Count)
	f := &b.f64
	f[0].Append(st.Mean)
	f[1].Append(st.Min)
	f[2].Append(st.Max)
	f[3].Append(st.Std)
	f[4].Append(st.Last)
	f[5].Append(st.Slope)
	f[6].Append(st.Median)
	f[7].Append(st.P05)
	f[8].Append(st.P25)
	f[9].Append(st.P75)
	f[10].Append(st.P95)
	f[11].Append(st.Completeness)
	b.i64[5].Append(st.FirstTime)
	b.i64[6].Append(st.LastTime)
	b.i64[7].Append(st.SinceLast)
	b.dmap.Append(true)
	// Keys in name order.
	if st.HasDesat {
		b.kv("desat_events", float64(st.DesatEvents))
	}
	if st.HasHRV && st.HRV.N > 0 {
		b.kv("hrv_mean_nn_ms", st.HRV.MeanNN)
		b.kv("hrv_pnn50_pct", st.HRV.PNN50)
		b.kv("hrv_rmssd_ms", st.HRV.RMSSD)
		b.kv("hrv_sdnn_ms", st.HRV.SDNN)
	}
	if st.HasDesat {
		b.kv("odi_per_h", st.ODI)
	}
	if st.HasWear {
		b.kv("wear_time_s", st.WearS)
	}
}

func (b *Batch) kv(k string, v float64) {
	b.dkeys.Append(k)
	b.dvals.Append(v)
}

func (b *Batch) appendDerived(h *rowHeader, name, unit string, count uint64, mean, last float64) {
	b.header(h)
	b.str[3].Append(name)
	b.unit.Append(unit)
	b.dflag.Append(true)
	b.count.Append(count)
	for i := range b.f64 {
		switch i {
		case 0:
			b.f64[i].Append(mean)
		case 4:
			b.f64[i].Append(last)
		case 11:
			b.f64[i].Append(-1)
		default:
			b.f64[i].Append(0)
		}
	}
	b.i64[5].Append(0)
	b.i64[6].Append(0)
	b.i64[7].Append(0)
	b.dmap.Append(true)
}

// Columns gives typed access to a feature record's columns (valid while
// the record is).
type Columns struct {
	Tenant, Patient, Window, Metric, Unit *array.String
	Kind                                  *array.Int32
	SizeMs, StepMs, StartMs, EndMs        *array.Int64
	WatermarkMs, FirstTimeMs, LastTimeMs  *array.Int64
	SinceLastMs                           *array.Int64
	Version                               *array.Uint32
	Count                                 *array.Uint64
	DerivedMetric                         *array.Boolean
	Mean, Min, Max, Std, Last, Slope      *array.Float64
	Median, P05, P25, P75, P95            *array.Float64
	Completeness                          *array.Float64
	Derived                               *array.Map
}

// ColumnsOf returns the typed columns of rec, which must have Schema.
func ColumnsOf(rec arrow.Record) (Columns, error) {
	if !rec.Schema().Equal(Schema) {
		return Columns{}, fmt.Errorf("feature record: schema %s is not the window schema", rec.Schema())
	}
	c := func(i int) arrow.Array { return rec.Column(i) }
	return Columns{
		Tenant: c(ColTenant).(*array.String), Patient: c(ColPatient).(*array.String), Window: c(ColWindow).(*array.String),
		Metric: c(ColMetric).(*array.String), Unit: c(ColUnit).(*array.String), Kind: c(ColKind).(*array.Int32),
		SizeMs: c(ColSizeMs).(*array.Int64), StepMs: c(ColStepMs).(*array.Int64), StartMs: c(ColStartMs).(*array.Int64),
		EndMs: c(ColEndMs).(*array.Int64), WatermarkMs: c(ColWatermarkMs).(*array.Int64),
		FirstTimeMs: c(ColFirstTimeMs).(*array.Int64), LastTimeMs: c(ColLastTimeMs).(*array.Int64),
		SinceLastMs: c(ColSinceLastMs).(*array.Int64), Version: c(ColVersion).(*array.Uint32),
		Count: c(ColCount).(*array.Uint64), DerivedMetric: c(ColDerivedMetric).(*array.Boolean),
		Mean: c(ColMean).(*array.Float64), Min: c(ColMin).(*array.Float64), Max: c(ColMax).(*array.Float64),
		Std: c(ColStd).(*array.Float64), Last: c(ColLast).(*array.Float64), Slope: c(ColSlopePerMin).(*array.Float64),
		Median: c(ColMedian).(*array.Float64), P05: c(ColP05).(*array.Float64), P25: c(ColP25).(*array.Float64),
		P75: c(ColP75).(*array.Float64), P95: c(ColP95).(*array.Float64), Completeness: c(ColCompleteness).(*array.Float64),
		Derived: c(ColDerived).(*array.Map),
	}, nil
}

// strTable copies strings out of Arrow buffers: array.String.Value aliases
// the buffer, which a Batch reuses once the record is released. With a
// table (a Batch's), the copies are interned: feature records repeat a few
// strings (tenants, patients, window and metric names, units); the table
// holds at most maxInterned strings and is emptied when full. The zero
// strTable interns nothing and copies every string.
type strTable struct {
	m map[string]string
}

// maxInterned bounds a strTable.
const maxInterned = 1 << 15

func (t *strTable) get(s string) string {
	if t.m == nil {
		return strings.Clone(s)
	}
	if v, ok := t.m[s]; ok {
		return v
	}
	if len(t.m) >= maxInterned {
		clear(t.m)
	}
	v := strings.Clone(s)
	t.m[v] = v
	return v
}

// Intern returns s (read from a record of b) as a string that does not
// alias the record's buffers, which b reuses once the record is released.
func (b *Batch) Intern(s string) string {
	if b.strs.m == nil {
		b.strs.m = make(map[string]string, 64)
	}
	return b.strs.get(s)
}

// ToProto is the package's ToProto with the strings interned in b's table
// (see Intern). rec need not come from b.
func (b *Batch) ToProto(rec arrow.Record, emittedMs int64) ([]*vigilv1.FeatureWindow, error) {
	if b.strs.m == nil {
		b.strs.m = make(map[string]string, 64)
	}
	return toProto(rec, emittedMs, &b.strs)
}

// ToProto encodes a feature record as FeatureWindow messages (one per
// window: adjacent rows with equal patient, window, start, end and
// version), with emitted time emittedMs. The messages share no memory
// with rec.
func ToProto(rec arrow.Record, emittedMs int64) ([]*vigilv1.FeatureWindow, error) {
	return toProto(rec, emittedMs, &strTable{})
}

func toProto(rec arrow.Record, emittedMs int64, strs *strTable) ([]*vigilv1.FeatureWindow, error) {
	c, err := ColumnsOf(rec)
	if err != nil {
		return nil, err
	}
	return appendProto(nil, &c, 0, int(rec.NumRows()), emittedMs, strs), nil
}

// AppendProto appends to dst the FeatureWindow messages of rows [lo, hi)
// of the record whose columns c are (grouped as ToProto does), with the
// strings interned in b's table, and returns the extended slice.
func (b *Batch) AppendProto(dst []*vigilv1.FeatureWindow, c *Columns, lo, hi int, emittedMs int64) []*vigilv1.FeatureWindow {
	if b.strs.m == nil {
		b.strs.m = make(map[string]string, 64)
	}
	return appendProto(dst, c, lo, hi, emittedMs, &b.strs)
}

func appendProto(out []*vigilv1.FeatureWindow, c *Columns, lo, hi int, emittedMs int64, strs *strTable) []*vigilv1.FeatureWindow {
	keys := c.Derived.Keys().(*array.String)
	items := c.Derived.Items().(*array.Float64)
	var fw *vigilv1.FeatureWindow
	for i := lo; i < hi; i++ {
		if fw == nil || fw.Patient != c.Patient.Value(i) || fw.Tenant != c.Tenant.Value(i) || fw.Window != c.Window.Value(i) ||
			fw.StartMs != c.StartMs.Value(i) || fw.EndMs != c.EndMs.Value(i) || fw.Version != c.Version.Value(i) {
			fw = &vigilv1.FeatureWindow{
				SchemaVersion: 1, Tenant: strs.get(c.Tenant.Value(i)), Patient: strs.get(c.Patient.Value(i)), Window: strs.get(c.Window.Value(i)),
				Kind: vigilv1.WindowKind(c.Kind.Value(i)), SizeMs: c.SizeMs.Value(i), StepMs: c.StepMs.Value(i),
				StartMs: c.StartMs.Value(i), EndMs: c.EndMs.Value(i), Version: c.Version.Value(i),
				EmittedTimeMs: emittedMs, WatermarkMs: c.WatermarkMs.Value(i),
			}
			out = append(out, fw)
		}
		f := &vigilv1.Feature{
			Metric: strs.get(c.Metric.Value(i)), Unit: strs.get(c.Unit.Value(i)), Count: c.Count.Value(i), Mean: c.Mean.Value(i),
			Min: c.Min.Value(i), Max: c.Max.Value(i), Std: c.Std.Value(i), Last: c.Last.Value(i),
			LastTimeMs: c.LastTimeMs.Value(i), SlopePerMin: c.Slope.Value(i), Median: c.Median.Value(i),
			P05: c.P05.Value(i), P95: c.P95.Value(i), FirstTimeMs: c.FirstTimeMs.Value(i),
			Completeness: c.Completeness.Value(i), P25: c.P25.Value(i), P75: c.P75.Value(i),
			SinceLastMs: c.SinceLastMs.Value(i), DerivedMetric: c.DerivedMetric.Value(i),
		}
		if lo, hi := c.Derived.ValueOffsets(i); hi > lo {
			f.Derived = make(map[string]float64, hi-lo)
			for j := lo; j < hi; j++ {
				f.Derived[strs.get(keys.Value(int(j)))] = items.Value(int(j))
			}
		}
		fw.Features = append(fw.Features, f)
	}
	return out
}
