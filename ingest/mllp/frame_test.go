package mllp

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"testing/iotest"

	"github.com/vigilhealth/vigil/internal/testenv"
)

func TestReaderTolerance(t *testing.T) {
	var in []byte
	in = append(in, 0, 0, '\n')
	in = AppendFrame(in, []byte("one"))
	in = append(in, '\r', '\n', 0, 0)
	in = append(in, "junk"...)
	in = AppendFrame(in, []byte("two"))
	in = append(in, StartBlock)
	in = append(in, "three"...)
	in = append(in, EndBlock) // no CR
	in = append(in, StartBlock)
	in = append(in, "lost half"...)
	in = AppendFrame(in, []byte("four")) // a VT inside an unfinished frame restarts it
	in = AppendFrame(in, bytes.Repeat([]byte("x"), 100))
	in = AppendFrame(in, []byte("five"))
	in = append(in, StartBlock, 's', 'i')

	for name, r := range map[string]io.Reader{
		"whole":    bytes.NewReader(in),
		"one byte": iotest.OneByteReader(bytes.NewReader(in)),
	} {
		fr := NewReader(r, 50)
		var got []string
		var tooLarge int
		for {
			msg, err := fr.Next()
			var fe *FrameError
			if errors.As(err, &fe) {
				tooLarge++
				if fe.Size != 100 || len(msg) != 0 && len(msg) > 50 {
					t.Errorf("%s: frame error %v with %d bytes", name, fe, len(msg))
				}
				continue
			}
			if err != nil {
				if !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Errorf("%s: end %v, want unexpected EOF (a frame was cut)", name, err)
				}
				break
			}
			got = append(got, string(msg))
		}
		want := []string{"one", "two", "three", "four", "five"}
		if len(got) != len(want) {
			t.Fatalf("%s: frames %q, want %q", name, got, want)
		}
		for i := range want {
			if got[i] != want[i] {
				t.Errorf("%s: frame %d %q, want %q", name, i, got[i], want[i])
			}
		}
		if tooLarge != 1 {
			t.Errorf("%s: %d too-large frames, want 1", name, tooLarge)
		}
		if fr.Garbage != int64(len("junk")+len("lost half")) {
			t.Errorf("%s: garbage %d", name, fr.Garbage)
		}
	}
}

func TestReaderLargeFrameStaysBounded(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789"), 1<<20) // 10 MiB
	in := AppendFrame(nil, big)
	in = AppendFrame(in, []byte("after"))
	fr := NewReader(bytes.NewReader(in), 4096)
	msg, err := fr.Next()
	if !errors.Is(err, ErrTooLarge) || len(msg) > 4096 {
		t.Fatalf("got %d bytes, %v", len(msg), err)
	}
	if cap(fr.buf) > 64<<10 {
		t.Errorf("buffer grew to %d bytes for a 4 KiB bound", cap(fr.buf))
	}
	msg, err = fr.Next()
	if err != nil || string(msg) != "after" {
		t.Fatalf("after a skipped frame: %q %v", msg, err)
	}
}

// FuzzMLLPFramer reads arbitrary byte streams: no panic or hang, frames
// never exceed the bound, and what was framed by AppendFrame comes back.
func FuzzMLLPFramer(f *testing.F) {
	dir := filepath.Join(testenv.Dataset(f, "hl7v2-samples"), "messages")
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err == nil {
			f.Add(AppendFrame([]byte{0, '\n'}, b))
		}
	}
	f.Add([]byte{StartBlock, EndBlock, CarriageReturn, StartBlock, StartBlock, 'a', EndBlock})
	f.Add([]byte("garbage\x0bMSH|^~\\&\x1c\r\x00\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		const max = 256
		fr := NewReader(bytes.NewReader(data), max)
		frames := 0
		for {
			msg, err := fr.Next()
			if len(msg) > max {
				t.Fatalf("frame of %d bytes over the bound %d", len(msg), max)
			}
			if err != nil {
				var fe *FrameError
				if errors.As(err, &fe) {
					continue
				}
				break
			}
			if bytes.IndexByte(msg, StartBlock) >= 0 || bytes.IndexByte(msg, EndBlock) >= 0 {
				t.Fatalf("frame contains a framing byte: %q", msg)
			}
			frames++
			if frames > len(data) {
				t.Fatal("more frames than bytes")
			}
		}
		// A payload without framing bytes survives a round trip.
		clean := bytes.Map(func(r rune) rune {
			if r == StartBlock || r == EndBlock {
				return -1
			}
			return r
		}, data)
		if len(clean) <= max {
			fr := NewReader(bytes.NewReader(AppendFrame(nil, clean)), max)
			msg, err := fr.Next()
			if err != nil || !bytes.Equal(msg, clean) {
				t.Fatalf("round trip of %q: %q %v", clean, msg, err)
			}
		}
	})
}
