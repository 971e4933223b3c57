package window

import (
	"testing"

	"github.com/apache/arrow/go/v17/arrow/memory"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// TestBufferPoolReusesZeroedAndBalances: freed buffers come back (zeroed)
// for the next allocation of their size class, resizing keeps content,
// the kept bytes stay bounded, and after drain the parent allocator is
// balanced.
func TestBufferPoolReusesZeroedAndBalances(t *testing.T) {
	mem := memory.NewCheckedAllocator(memory.NewGoAllocator())
	p := &bufferPool{parent: mem}
	a := p.Allocate(100)
	if len(a) != 100 || cap(a) != 128 {
		t.Fatalf("Allocate(100): len %d cap %d, want 100, 128", len(a), cap(a))
	}
	for i := range a {
		a[i] = 0xff
	}
	p.Free(a)
	b := p.Allocate(120)
	if &b[0] != &a[0] {
		t.Error("a freed buffer of the class was not reused")
	}
	for i, x := range b {
		if x != 0 {
			t.Fatalf("reused buffer not zeroed at %d", i)
		}
	}
	b[0] = 7
	c := p.Reallocate(1000, b)
	if len(c) != 1000 || c[0] != 7 || c[999] != 0 {
		t.Errorf("Reallocate lost content or did not zero: len %d c[0] %d", len(c), c[0])
	}
	big := p.Allocate(1 << 20) // beyond the classes: passes through
	p.Free(big)
	var held [][]byte
	for range 100 {
		held = append(held, p.Allocate(60<<10))
	}
	for _, h := range held {
		p.Free(h)
	}
	if p.kept > poolMaxBytes {
		t.Errorf("pool keeps %d bytes, bound %d", p.kept, poolMaxBytes)
	}
	p.Free(c)
	p.drain()
	mem.AssertSize(t, 0)
	d := p.Allocate(64) // after drain: straight from the parent
	p.Free(d)
	mem.AssertSize(t, 0)
}

// TestBatchReuseKeepsProtosIntact: feature messages taken from a record
// stay intact after the record is released and its buffers are reused by
// the next records of the batch (strings are copied out of the Arrow
// buffers).
func TestBatchReuseKeepsProtosIntact(t *testing.T) {
	mem := memory.NewCheckedAllocator(memory.NewGoAllocator())
	b := NewBatch(mem)
	add := func(patient string, end int64) {
		h := rowHeader{tenant: "t", patient: patient, window: "1m", kind: vigilv1.WindowKind_WINDOW_KIND_TUMBLING,
			sizeMs: 60000, stepMs: 60000, startMs: end - 60000, endMs: end, version: 1, watermarkMs: end}
		st := Stats{Count: 2, Mean: 70, Last: 71, HasDesat: true, DesatEvents: 1}
		b.appendRow(&h, &metric{name: "heart_rate", unit: "/min"}, &st, false)
		b.appendRow(&h, &metric{name: "spo2", unit: "%"}, &st, false)
	}
	var kept []*vigilv1.FeatureWindow
	for i := range 50 {
		add("patient-a", int64(i+1)*60000)
		b.Seal()
		add("patient-b", int64(i+1)*60000)
		if ws := b.Windows(); len(ws) != 2 || ws[0].Rows != 2 || ws[1].Rows != 2 {
			t.Fatalf("Windows() = %+v, want two windows of two rows", ws)
		}
		rec := b.NewRecord()
		cols, err := ColumnsOf(rec)
		if err != nil {
			t.Fatal(err)
		}
		fws := b.AppendProto(nil, &cols, 0, int(rec.NumRows()), 5)
		rec.Release()
		if len(fws) != 2 {
			t.Fatalf("%d feature windows, want 2", len(fws))
		}
		kept = append(kept, fws[0])
	}
	for i, fw := range kept {
		if fw.Patient != "patient-a" || fw.Tenant != "t" || fw.Window != "1m" || fw.EndMs != int64(i+1)*60000 ||
			len(fw.Features) != 2 || fw.Features[0].Metric != "heart_rate" || fw.Features[1].Unit != "%" ||
			fw.Features[0].Derived["desat_events"] != 1 || len(fw.Features[0].Derived) != 2 {
			t.Fatalf("window %d changed after its record was released: %v", i, fw)
		}
	}
	b.Release()
	mem.AssertSize(t, 0)
}
