package wfdb

import (
	"bytes"
	"errors"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vigilhealth/vigil/internal/testenv"
)

func TestHeaderRecord100(t *testing.T) {
	rec, err := Open(testenv.Dataset(t, "mitbih-100"), "100")
	if err != nil {
		t.Fatal(err)
	}
	h := rec.Header
	if h.Record != "100" || h.FreqHz != 360 || h.CounterFreqHz != 360 || h.NumSamples != 650000 || len(h.Signals) != 2 {
		t.Fatalf("record line: %+v", h)
	}
	want := []Signal{
		{FileName: "100.dat", Format: 212, SamplesPerFrame: 1, Gain: 200, Baseline: 1024, Units: "mV", ADCRes: 11, ADCZero: 1024,
			InitValue: 995, Checksum: -22131, HasInitValue: true, HasChecksum: true, Description: "MLII"},
		{FileName: "100.dat", Format: 212, SamplesPerFrame: 1, Gain: 200, Baseline: 1024, Units: "mV", ADCRes: 11, ADCZero: 1024,
			InitValue: 1011, Checksum: 20052, HasInitValue: true, HasChecksum: true, Description: "V5"},
	}
	for i := range want {
		if h.Signals[i] != want[i] {
			t.Errorf("signal %d:\n got %+v\nwant %+v", i, h.Signals[i], want[i])
		}
	}
	if len(h.Comments) != 2 || h.Comments[0] != "69 M 1085 1629 x1" || h.Comments[1] != "Aldomet, Inderal" {
		t.Errorf("comments: %q", h.Comments)
	}
}

func TestHeaderVariants(t *testing.T) {
	h, err := ParseHeader(strings.NewReader("rec 2 500/1000(12) 100 10:00:00 01/02/2003\n" +
		"a.dat 16+512 100(5)/uV 16 0 7 0 0 lead I\n" +
		"a.dat 16 0\n"))
	if err != nil {
		t.Fatal(err)
	}
	if h.FreqHz != 500 || h.CounterFreqHz != 1000 || h.BaseCounter != 12 || h.NumSamples != 100 || h.BaseTime != "10:00:00" || h.BaseDate != "01/02/2003" {
		t.Errorf("record line: %+v", h)
	}
	s := h.Signals[0]
	if s.ByteOffset != 512 || s.Gain != 100 || s.Baseline != 5 || s.Units != "uV" || s.ADCRes != 16 || s.Description != "lead I" {
		t.Errorf("signal 0: %+v", s)
	}
	// Gain 0 means the default 200; baseline defaults to ADC zero (0).
	if s := h.Signals[1]; s.Gain != DefaultGain || s.Baseline != 0 || s.Units != "mV" || s.HasChecksum {
		t.Errorf("signal 1: %+v", s)
	}
	for _, bad := range []string{"", "# only comment\n", "r 2 360\nx.dat 212\n", "r x\n", "r 1 -5\n", "r/2 1\n", "r 1\nx.dat 212 20(\n"} {
		if _, err := ParseHeader(strings.NewReader(bad)); err == nil {
			t.Errorf("ParseHeader(%q) accepted", bad)
		}
	}
}

// TestFirstSamplesRecord100 decodes the first frames of record 100 and
// checks them against a hand decode of the first bytes of 100.dat:
//
//	e3 33 f3: MLII = 0xe3 | (0x33&0x0f)<<8 = 0x3e3 = 995 -> (995-1024)/200 = -0.145 mV
//	          V5   = 0xf3 | (0x33&0xf0)<<4 = 0x3f3 = 1011 -> (1011-1024)/200 = -0.065 mV
//	(frames 0-7 repeat e3 33 f3)
//	e8 33 f0 (frame 8): MLII 0x3e8 = 1000 -> -0.120 mV; V5 0x3f0 = 1008 -> -0.080 mV
//	e5 33 f0 (frame 9): MLII 0x3e5 = 997  -> -0.135 mV; V5 1008 -> -0.080 mV
//
// and the header's initial values (995, 1011) and checksums (16-bit sums of
// all 650,000 samples: -22131, 20052).
func TestFirstSamplesRecord100(t *testing.T) {
	rec, err := Open(testenv.Dataset(t, "mitbih-100"), "100")
	if err != nil {
		t.Fatal(err)
	}
	sr, c, err := rec.Frames()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]int, 2*777) // odd frame count per call: pairs stay in step
	var frames int64
	var sum [2]int
	var first []int
	for {
		n, err := sr.ReadFrames(buf)
		if frames == 0 {
			first = append(first, buf[:20]...)
		}
		for i := 0; i < n; i++ {
			sum[0] += buf[2*i]
			sum[1] += buf[2*i+1]
		}
		frames += int64(n)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	want := []int{995, 1011, 995, 1011, 995, 1011, 995, 1011, 995, 1011, 995, 1011, 995, 1011, 995, 1011, 1000, 1008, 997, 1008}
	for i := range want {
		if first[i] != want[i] {
			t.Fatalf("first ADC values %v, want %v", first, want)
		}
	}
	if frames != rec.Header.NumSamples {
		t.Errorf("read %d frames, header says %d", frames, rec.Header.NumSamples)
	}
	for k, s := range rec.Header.Signals {
		if got := int(int16(uint16(sum[k]))); got != s.Checksum {
			t.Errorf("signal %s checksum %d, header says %d", s.Description, got, s.Checksum)
		}
		if first[k] != s.InitValue {
			t.Errorf("signal %s first value %d, header says %d", s.Description, first[k], s.InitValue)
		}
	}
	phys, err := rec.ReadPhysical()
	if err != nil {
		t.Fatal(err)
	}
	wantMV := [][]float64{{-0.145, -0.145, -0.145, -0.145, -0.145, -0.145, -0.145, -0.145, -0.12, -0.135},
		{-0.065, -0.065, -0.065, -0.065, -0.065, -0.065, -0.065, -0.065, -0.08, -0.08}}
	for k := range wantMV {
		if len(phys[k]) != 650000 {
			t.Fatalf("signal %d: %d samples", k, len(phys[k]))
		}
		for i, w := range wantMV[k] {
			if math.Abs(phys[k][i]-w) > 1e-12 {
				t.Errorf("signal %d sample %d = %v mV, want %v", k, i, phys[k][i], w)
			}
		}
	}
}

func TestDecode212Negative(t *testing.T) {
	// 0xfff -> -1 (first), 0x800 -> -2048 = invalid (second), 0x7ff -> 2047.
	got := make([]int, 4)
	n := Decode212(got, []byte{0xff, 0x8f, 0x00, 0xff, 0x07})
	if n != 3 || got[0] != -1 || got[1] != InvalidADC || got[2] != 2047 {
		t.Fatalf("Decode212 = %d %v", n, got)
	}
	s := Signal{Gain: 200, Baseline: 0}
	if !math.IsNaN(s.Physical(got[1])) {
		t.Error("invalid sample not NaN")
	}
}

func TestAnnotationsRecord100(t *testing.T) {
	anns, err := ReadAnnotations(testenv.Dataset(t, "mitbih-100"), "100", "atr", 0)
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]int{}
	beats := 0
	for _, a := range anns {
		counts[a.Type.String()]++
		if a.Type.IsBeat() {
			beats++
		}
	}
	// MIT-BIH directory for record 100: 2,239 normal, 33 APC, 1 PVC.
	if beats != 2273 || counts["N"] != 2239 || counts["A"] != 33 || counts["V"] != 1 {
		t.Errorf("beats %d, counts %v; want 2273 beats (N 2239, A 33, V 1)", beats, counts)
	}
	// First word 0x7012: code 28 (+, rhythm) at 18, then AUX "(N"; then
	// 0x043b: N at 18+59 = 77.
	if a := anns[0]; a.Type != Rhythm || a.Sample != 18 || a.Aux != "(N" {
		t.Errorf("first annotation %+v", a)
	}
	if a := anns[1]; a.Type != Normal || a.Sample != 77 {
		t.Errorf("second annotation %+v", a)
	}
	last := anns[len(anns)-1]
	if last.Sample >= 650000 || last.Sample < 649000 {
		t.Errorf("last annotation at %d, want inside the record's end", last.Sample)
	}
	for i := 1; i < len(anns); i++ {
		if anns[i].Sample < anns[i-1].Sample {
			t.Fatalf("annotation %d goes back in time", i)
		}
	}
}

func TestAnnotationModifiers(t *testing.T) {
	var b bytes.Buffer
	w := func(code, data int) { b.WriteByte(byte(data)); b.WriteByte(byte(code<<2 | data>>8)) }
	w(codeSkip, 0)
	b.Write([]byte{0x01, 0x00, 0x00, 0x00}) // 65536 (high word 0x0001 first)
	w(int(Normal), 10)                      // at 65546
	w(codeChn, 1)
	w(codeNum, 7)
	w(codeSub, 3)
	w(codeAux, 3)
	b.WriteString("abc\x00")
	w(int(PVC), 1023) // at 66569, chan and num carry over, subtype resets
	w(0, 0)
	w(int(Normal), 5) // after the end marker: not read
	r := NewAnnotationReader(&b)
	a1, err := r.Next()
	if err != nil || a1 != (Annotation{Sample: 65546, Type: Normal, Chan: 1, Num: 7, Subtype: 3, Aux: "abc"}) {
		t.Fatalf("first %+v %v", a1, err)
	}
	a2, err := r.Next()
	if err != nil || a2 != (Annotation{Sample: 66569, Type: PVC, Chan: 1, Num: 7}) {
		t.Fatalf("second %+v %v", a2, err)
	}
	if _, err := r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("after end marker: %v", err)
	}
	for _, bad := range [][]byte{{0x05, codeAux << 2}, {0x01}, {0x0a, 0x04, 0x03, codeAux << 2, 'x'}} {
		r := NewAnnotationReader(bytes.NewReader(bad))
		var err error
		for range 10 {
			if _, err = r.Next(); err != nil {
				break
			}
		}
		if err == nil || errors.Is(err, io.EOF) {
			t.Errorf("% x: err %v, want a malformed-file error", bad, err)
		}
	}
}

func seed(f *testing.F, name string, limit int) {
	b, err := os.ReadFile(filepath.Join(testenv.Dataset(f, "mitbih-100"), name))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b[:min(len(b), limit)])
}

func FuzzWFDBHeader(f *testing.F) {
	seed(f, "100.hea", 1<<20)
	f.Add([]byte("r 1 500/1000(3) 10\na.dat 16x2:1+8 100(2)/uV 16 0 0 0 0 d\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader(bytes.NewReader(b))
		if err != nil {
			return
		}
		for _, s := range h.Signals {
			if s.Gain == 0 || math.IsNaN(s.Gain) || s.SamplesPerFrame < 1 {
				t.Fatalf("bad signal %+v", s)
			}
		}
		if !(h.FreqHz > 0) || !(h.CounterFreqHz > 0) {
			t.Fatalf("bad frequency %+v", h)
		}
	})
}

func FuzzFormat212(f *testing.F) {
	seed(f, "100.dat", 3000)
	f.Add([]byte{0xff, 0x8f, 0x00, 0xff, 0x07})
	f.Fuzz(func(t *testing.T, b []byte) {
		dst := make([]int, len(b))
		n := Decode212(dst, b)
		if want := len(b)/3*2 + (len(b)%3)/2; n != want {
			t.Fatalf("decoded %d samples from %d bytes, want %d", n, len(b), want)
		}
		for _, v := range dst[:n] {
			if v != InvalidADC && (v < -2047 || v > 2047) {
				t.Fatalf("value %d out of 12-bit range", v)
			}
		}
		// The streaming reader agrees with the block decoder, whatever the
		// frame width (3 signals: pairs straddle frames).
		sr, _ := NewSampleReader(bytes.NewReader(b), 212, 3)
		got := make([]int, 0, n)
		buf := make([]int, 6)
		for {
			k, err := sr.ReadFrames(buf)
			got = append(got, buf[:3*k]...)
			if err != nil {
				break
			}
		}
		if len(got) != n/3*3 {
			t.Fatalf("reader gave %d values, want %d", len(got), n/3*3)
		}
		for i := range got {
			if got[i] != dst[i] {
				t.Fatalf("value %d: reader %d, decoder %d", i, got[i], dst[i])
			}
		}
	})
}

func FuzzAnnotations(f *testing.F) {
	seed(f, "100.atr", 1<<20)
	f.Add([]byte{0, codeSkip << 2, 1, 0, 0, 0, 10, 4, 3, codeAux << 2, 'a', 'b', 'c', 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewAnnotationReader(bytes.NewReader(b))
		n := 0
		for {
			_, err := r.Next()
			if err != nil {
				break
			}
			n++
			if n > len(b)/2 {
				t.Fatalf("%d annotations from %d bytes", n, len(b))
			}
		}
	})
}
