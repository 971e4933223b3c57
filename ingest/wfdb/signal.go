package wfdb

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Decode212 decodes format-212 bytes into dst: every three bytes hold two
// 12-bit two's-complement samples, the first in byte 0 plus the low nibble
// of byte 1 (bits 8-11), the second in byte 2 plus the high nibble of byte 1.
// A trailing pair of bytes yields one more sample; a trailing single byte
// none. The invalid code -2048 becomes InvalidADC. It decodes
// min(len(dst), samples in src) values and returns how many.
func Decode212(dst []int, src []byte) int {
	n := 0
	for len(src) >= 2 && n < len(dst) {
		dst[n] = sign12(int(src[0]) | int(src[1]&0x0f)<<8)
		n++
		if len(src) < 3 || n == len(dst) {
			break
		}
		dst[n] = sign12(int(src[2]) | int(src[1]&0xf0)<<4)
		n++
		src = src[3:]
	}
	return n
}

func sign12(v int) int {
	if v >= 2048 {
		v -= 4096
	}
	if v == -2048 {
		return InvalidADC
	}
	return v
}

// SampleReader decodes the interleaved frames of a signal file: each frame
// holds one sample of each of its signals, in header order. It buffers its
// input (4 KiB) and decodes into caller buffers; not safe for concurrent use.
type SampleReader struct {
	r       *bufio.Reader
	format  int
	nsig    int
	pending int  // second sample of a 212 pair, when havePend
	havePnd bool // a decoded 212 sample is waiting
	buf     [3]byte
}

// NewSampleReader reads frames of nsig signals stored in format (212 or 16)
// from r.
func NewSampleReader(r io.Reader, format, nsig int) (*SampleReader, error) {
	if format != 212 && format != 16 {
		return nil, fmt.Errorf("signal format %d: %w", format, ErrUnsupported)
	}
	if nsig < 1 || nsig > MaxSignals {
		return nil, fmt.Errorf("number of signals %d: want 1..%d", nsig, MaxSignals)
	}
	return &SampleReader{r: bufio.NewReaderSize(r, 4096), format: format, nsig: nsig}, nil
}

// ReadFrames decodes up to len(dst)/nsig whole frames into dst (ADC
// values, frame after frame) and returns the number of frames. At the end of
// the data it returns the frames it decoded and io.EOF (a trailing partial
// frame is dropped, as the reference library does); other errors are the
// underlying reader's.
func (s *SampleReader) ReadFrames(dst []int) (int, error) {
	want := len(dst) / s.nsig * s.nsig
	for i := 0; i < want; i++ {
		v, err := s.next()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				err = io.EOF
			}
			return i / s.nsig, err
		}
		dst[i] = v
	}
	return want / s.nsig, nil
}

func (s *SampleReader) next() (int, error) {
	switch s.format {
	case 16:
		if _, err := io.ReadFull(s.r, s.buf[:2]); err != nil {
			return 0, err
		}
		return int(int16(uint16(s.buf[0]) | uint16(s.buf[1])<<8)), nil
	default: // 212
		if s.havePnd {
			s.havePnd = false
			return s.pending, nil
		}
		n, err := io.ReadFull(s.r, s.buf[:3])
		if n < 2 {
			if err == nil {
				err = io.EOF
			}
			return 0, err
		}
		var two [2]int
		got := Decode212(two[:], s.buf[:n])
		if got == 2 {
			s.pending, s.havePnd = two[1], true
		}
		return two[0], nil
	}
}

// Record is a WFDB record on disk: its header and the folder holding its
// files.
type Record struct {
	Header *Header
	Dir    string
}

// Open reads the header dir/record.hea.
func Open(dir, record string) (*Record, error) {
	f, err := os.Open(filepath.Join(dir, record+".hea"))
	if err != nil {
		return nil, fmt.Errorf("opening WFDB header: %w", err)
	}
	defer f.Close()
	h, err := ParseHeader(f)
	if err != nil {
		return nil, err
	}
	return &Record{Header: h, Dir: dir}, nil
}

// Frames opens the record's signal file and returns a reader of its frames
// and the file to close. All signals must share one file and one format,
// with one sample per frame and no skew.
func (r *Record) Frames() (*SampleReader, io.Closer, error) {
	sig := r.Header.Signals
	if len(sig) == 0 {
		return nil, nil, errors.New("opening WFDB signals: record has no signals")
	}
	for _, s := range sig {
		if s.FileName != sig[0].FileName || s.Format != sig[0].Format || s.ByteOffset != sig[0].ByteOffset {
			return nil, nil, fmt.Errorf("signals in several files or formats: %w", ErrUnsupported)
		}
		if s.SamplesPerFrame != 1 || s.Skew != 0 {
			return nil, nil, fmt.Errorf("skew or several samples per frame: %w", ErrUnsupported)
		}
	}
	name := sig[0].FileName
	if name != filepath.Base(name) || name == "-" {
		return nil, nil, fmt.Errorf("signal file name %q: must be a plain file name beside the header", name)
	}
	f, err := os.Open(filepath.Join(r.Dir, name))
	if err != nil {
		return nil, nil, fmt.Errorf("opening WFDB signal file: %w", err)
	}
	if sig[0].ByteOffset > 0 {
		if _, err := f.Seek(sig[0].ByteOffset, io.SeekStart); err != nil {
			f.Close()
			return nil, nil, fmt.Errorf("seeking to the first sample: %w", err)
		}
	}
	sr, err := NewSampleReader(f, sig[0].Format, len(sig))
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return sr, f, nil
}

// ReadPhysical reads the whole record and returns each signal's samples in
// physical units (NaN where invalid), one slice per signal. It allocates
// NumSamples values per signal (bounded by what the file holds).
func (r *Record) ReadPhysical() ([][]float64, error) {
	sr, c, err := r.Frames()
	if err != nil {
		return nil, err
	}
	defer c.Close()
	nsig := len(r.Header.Signals)
	out := make([][]float64, nsig)
	capHint := int(min(r.Header.NumSamples, 1<<24))
	for i := range out {
		out[i] = make([]float64, 0, capHint)
	}
	buf := make([]int, 1024*nsig)
	for {
		n, err := sr.ReadFrames(buf)
		for f := 0; f < n; f++ {
			for k := 0; k < nsig; k++ {
				out[k] = append(out[k], r.Header.Signals[k].Physical(buf[f*nsig+k]))
			}
		}
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("reading WFDB samples: %w", err)
		}
	}
}
