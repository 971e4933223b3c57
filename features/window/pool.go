package window

import (
	"math/bits"

	"github.com/apache/arrow/go/v17/arrow/memory"
)

// Size classes of the buffers a bufferPool keeps: powers of two from
// 2^poolMinShift to 2^poolMaxShift bytes.
const (
	poolMinShift = 6
	poolMaxShift = 16
	// poolMaxFree bounds the free buffers kept per size class, and
	// poolMaxBytes their total size; beyond that a freed buffer goes back
	// to the parent allocator.
	poolMaxFree  = 512
	poolMaxBytes = 1 << 20
)

// bufferPool is the memory.Allocator of a Batch: it keeps the buffers of
// released records for the next records of the same Batch.
//
// Hand-written because every Batch.NewRecord hands all its builders'
// buffers to the record and the next row starts new ones: with Arrow's
// Go allocator that was two fresh, zeroed allocations per column for
// every closed window (a tenth of the stream stage's CPU, with the garbage
// collection it caused). Arrow has no recycling allocator for Go.
//
// Buffers of up to 64 KiB are kept in power-of-two size classes (at most
// poolMaxFree each and 1 MiB in all), zeroed when handed out again; larger ones pass
// through to the parent. It assumes the parent returns slices whose
// capacity is the size asked (memory.GoAllocator and CheckedAllocator
// do), and frees to the parent what it took from it, in full, so a
// CheckedAllocator parent balances once the Batch is released.
//
// Not safe for concurrent use: like its Batch, it belongs to one
// goroutine, which must also be the one releasing the Batch's records.
type bufferPool struct {
	parent  memory.Allocator
	free    [poolMaxShift + 1][][]byte
	kept    int // bytes in free
	drained bool
}

func classOf(size int) (int, bool) {
	if size <= 0 || size > 1<<poolMaxShift {
		return 0, false
	}
	return max(bits.Len(uint(size-1)), poolMinShift), true
}

// pooled reports whether b is a buffer of the pool's classes.
func pooled(b []byte) (int, bool) {
	c := cap(b)
	if c < 1<<poolMinShift || c > 1<<poolMaxShift || c&(c-1) != 0 {
		return 0, false
	}
	return bits.Len(uint(c)) - 1, true
}

// Allocate returns a zeroed buffer of size bytes.
func (p *bufferPool) Allocate(size int) []byte {
	c, ok := classOf(size)
	if !ok || p.drained {
		return p.parent.Allocate(size)
	}
	if l := p.free[c]; len(l) > 0 {
		b := l[len(l)-1]
		l[len(l)-1] = nil
		p.free[c] = l[:len(l)-1]
		p.kept -= cap(b)
		b = b[:size]
		clear(b)
		return b
	}
	return p.parent.Allocate(1 << c)[:size]
}

// Reallocate resizes b to size bytes, keeping its content (and zeroing
// what it grows by).
func (p *bufferPool) Reallocate(size int, b []byte) []byte {
	if _, ok := pooled(b); !ok {
		return p.parent.Reallocate(size, b)
	}
	if size <= cap(b) {
		n := len(b)
		b = b[:size]
		if size > n {
			clear(b[n:])
		}
		return b
	}
	nb := p.Allocate(size)
	copy(nb, b)
	p.Free(b)
	return nb
}

// Free keeps b for reuse (or hands it back to the parent).
func (p *bufferPool) Free(b []byte) {
	c, ok := pooled(b)
	if !ok {
		p.parent.Free(b)
		return
	}
	b = b[:cap(b)]
	if p.drained || len(p.free[c]) >= poolMaxFree || p.kept+cap(b) > poolMaxBytes {
		p.parent.Free(b)
		return
	}
	p.free[c] = append(p.free[c], b)
	p.kept += cap(b)
}

// drain hands every kept buffer back to the parent; buffers freed later
// go straight to it.
func (p *bufferPool) drain() {
	p.drained = true
	for c := range p.free {
		for i, b := range p.free[c] {
			p.parent.Free(b)
			p.free[c][i] = nil
		}
		p.free[c] = nil
	}
	p.kept = 0
}
