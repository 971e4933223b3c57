package mllp

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
)

// MLLP framing bytes: <VT> message <FS><CR>.
const (
	StartBlock     = 0x0b
	EndBlock       = 0x1c
	CarriageReturn = 0x0d
)

// ErrTooLarge is returned (wrapped in *FrameError) for a frame longer than
// the bound; the frame was skipped and the reader can go on.
var ErrTooLarge = errors.New("frame exceeds the size bound")

// FrameError is a frame that was skipped (too large); the stream is still
// in sync and reading may continue.
type FrameError struct {
	// Size is how many bytes the frame had when it was given up (at least
	// the bound).
	Size int
	Err  error
}

// Error describes the skipped frame.
func (e *FrameError) Error() string { return fmt.Sprintf("mllp frame of %d+ bytes: %v", e.Size, e.Err) }

// Unwrap returns the cause.
func (e *FrameError) Unwrap() error { return e.Err }

// Reader reads MLLP frames from a byte stream. It tolerates what real
// senders do: NUL bytes, line breaks or other garbage between frames
// (skipped and counted in Garbage), a missing <CR> after <FS>, and a new
// <VT> inside an unfinished frame (the unfinished part is dropped as
// garbage: the sender restarted). A frame longer than max bytes is skipped
// up to its <FS> without being buffered. A Reader is not safe for
// concurrent use.
type Reader struct {
	br  *bufio.Reader
	max int
	buf []byte
	// Garbage counts bytes skipped outside frames (NULs and line breaks
	// between frames excluded: they are normal padding).
	Garbage int64
}

// NewReader returns a Reader of r for frames of at most max bytes (the
// payload, without the framing bytes).
func NewReader(r io.Reader, max int) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, 16<<10), max: max}
}

// Next returns the next frame's payload, which stays valid until the next
// call (the Reader owns it). It blocks until a whole frame is read. At the
// end of the stream it returns io.EOF (io.ErrUnexpectedEOF inside a
// frame); a skipped frame returns its first max bytes and a *FrameError,
// after which Next may be called again; other errors are the underlying
// reader's.
func (r *Reader) Next() ([]byte, error) {
	// Skip to the start block.
	for {
		chunk, err := r.br.ReadSlice(StartBlock)
		r.countGarbage(chunk, err == nil)
		if err == nil {
			break
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		return nil, err
	}
	r.buf = r.buf[:0]
	size := 0
	for {
		chunk, err := r.br.ReadSlice(EndBlock)
		body := chunk
		if err == nil {
			body = chunk[:len(chunk)-1]
		}
		// A start block inside a frame: the sender gave up the frame
		// before it and began anew.
		if i := bytes.LastIndexByte(body, StartBlock); i >= 0 {
			r.Garbage += int64(size + i)
			size = 0
			r.buf = r.buf[:0]
			body = body[i+1:]
		}
		size += len(body)
		if size <= r.max {
			r.buf = append(r.buf, body...)
		}
		if err == nil {
			break
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if errors.Is(err, io.EOF) {
			return nil, io.ErrUnexpectedEOF
		}
		return nil, err
	}
	// The trailing <CR> is expected but not required.
	if b, err := r.br.Peek(1); err == nil && b[0] == CarriageReturn {
		_, _ = r.br.Discard(1)
	}
	if size > r.max {
		return r.buf, &FrameError{Size: size, Err: ErrTooLarge}
	}
	return r.buf, nil
}

func (r *Reader) countGarbage(chunk []byte, delimited bool) {
	if delimited {
		chunk = chunk[:len(chunk)-1]
	}
	for _, c := range chunk {
		switch c {
		case 0, '\r', '\n', ' ', '\t', EndBlock:
		default:
			r.Garbage++
		}
	}
}

// AppendFrame appends msg framed as <VT>msg<FS><CR> to dst.
func AppendFrame(dst, msg []byte) []byte {
	dst = append(dst, StartBlock)
	dst = append(dst, msg...)
	return append(dst, EndBlock, CarriageReturn)
}
