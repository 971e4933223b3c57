// Package wfdb reads PhysioNet WFDB records: the header (.hea), signal files
// in formats 212 (two 12-bit samples packed in three bytes, as the MIT-BIH
// databases use) and 16 (16-bit little-endian), and MIT-format annotation
// files (.atr and friends), with the standard beat-code classification.
//
// Written by hand because no maintained Go WFDB library exists; the formats
// follow the WFDB Programmer's Guide and the reference C library (header(5),
// signal(5), annot(5)).
//
// Every reader here bounds what outside bytes can make it allocate: headers
// are read up to MaxHeaderBytes with at most MaxSignals signals, signal
// readers decode into caller-provided buffers, and annotation readers return
// one annotation at a time (an AUX string is at most 1023 bytes by format).
// Nothing here is safe for concurrent use on the same value.
package wfdb

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
)

// MaxHeaderBytes bounds the size of a header file ParseHeader reads.
const MaxHeaderBytes = 1 << 20

// MaxSignals bounds the number of signals a header may declare.
const MaxSignals = 1024

// DefaultGain is the ADC gain (units per mV) WFDB assumes when a header
// gives none or gives 0.
const DefaultGain = 200

// DefaultFreqHz is the sampling frequency WFDB assumes when a header gives
// none.
const DefaultFreqHz = 250

// ErrUnsupported marks well-formed WFDB features this reader does not
// handle (multi-segment records, other signal formats, skew, several
// samples per frame).
var ErrUnsupported = errors.New("unsupported WFDB feature")

// Header is a parsed single-segment WFDB header.
type Header struct {
	// Record is the record name, e.g. "100".
	Record string
	// FreqHz is the sampling frequency per signal (frames per second).
	FreqHz float64
	// CounterFreqHz is the counter frequency; equal to FreqHz when absent.
	CounterFreqHz float64
	// BaseCounter is the counter value of sample 0.
	BaseCounter float64
	// NumSamples is the number of samples per signal; 0 when unknown.
	NumSamples int64
	// BaseTime and BaseDate are the record's start as written
	// ("HH:MM:SS", "DD/MM/YYYY"), empty when absent.
	BaseTime, BaseDate string
	// Signals, in frame order.
	Signals []Signal
	// Comments are the "#" lines, without the "#" and leading blanks.
	Comments []string
}

// Signal is one signal line of a header.
type Signal struct {
	// FileName holds the samples ("100.dat"); "-" means standard input.
	FileName string
	// Format is the storage format (212, 16, ...).
	Format int
	// SamplesPerFrame is 1 unless the header says otherwise.
	SamplesPerFrame int
	// Skew in frames; ByteOffset to the first sample in the file.
	Skew       int
	ByteOffset int64
	// Gain is ADC units per physical unit; Baseline the ADC value of 0
	// physical units.
	Gain     float64
	Baseline int
	// Units of the physical values ("mV" unless given).
	Units string
	// ADCRes in bits, ADCZero the ADC value in the middle of the range.
	ADCRes, ADCZero int
	// InitValue is the first sample's ADC value; Checksum the 16-bit
	// two's-complement sum of all samples. HasInitValue/HasChecksum say
	// whether the header gave them.
	InitValue, Checksum       int
	HasInitValue, HasChecksum bool
	// BlockSize in bytes (0: not a block device).
	BlockSize int
	// Description, e.g. the lead name "MLII".
	Description string
}

// InvalidADC is the ADC value WFDB uses for a missing sample (-32768); the
// format-212 reader maps its own invalid code (-2048) onto it.
const InvalidADC = math.MinInt16

// Physical converts an ADC value of this signal to physical units:
// (adc - Baseline) / Gain. InvalidADC becomes NaN.
func (s *Signal) Physical(adc int) float64 {
	if adc == InvalidADC {
		return math.NaN()
	}
	return float64(adc-s.Baseline) / s.Gain
}

// ParseHeader reads a WFDB header from r (at most MaxHeaderBytes).
func ParseHeader(r io.Reader) (*Header, error) {
	sc := bufio.NewScanner(io.LimitReader(r, MaxHeaderBytes))
	sc.Buffer(make([]byte, 0, 4096), MaxHeaderBytes)
	var h *Header
	nsig := 0
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" {
			continue
		}
		if strings.HasPrefix(text, "#") {
			if h != nil {
				h.Comments = append(h.Comments, strings.TrimSpace(strings.TrimPrefix(text, "#")))
			}
			continue
		}
		if h == nil {
			var err error
			h, nsig, err = parseRecordLine(text)
			if err != nil {
				return nil, fmt.Errorf("parsing record line %d: %w", line, err)
			}
			continue
		}
		if len(h.Signals) == nsig {
			// Lines after the signal lines that are not comments: the
			// reference library ignores them; so do we.
			continue
		}
		s, err := parseSignalLine(text)
		if err != nil {
			return nil, fmt.Errorf("parsing signal line %d: %w", line, err)
		}
		h.Signals = append(h.Signals, s)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading header: %w", err)
	}
	if h == nil {
		return nil, errors.New("parsing header: no record line")
	}
	if len(h.Signals) != nsig {
		return nil, fmt.Errorf("parsing header: record line declares %d signals, found %d", nsig, len(h.Signals))
	}
	return h, nil
}

func parseRecordLine(text string) (*Header, int, error) {
	f := strings.Fields(text)
	if len(f) < 2 {
		return nil, 0, errors.New("want record name and number of signals")
	}
	h := &Header{Record: f[0], FreqHz: DefaultFreqHz}
	if strings.Contains(f[0], "/") {
		return nil, 0, fmt.Errorf("multi-segment record %q: %w", f[0], ErrUnsupported)
	}
	nsig, err := strconv.Atoi(f[1])
	if err != nil || nsig < 0 || nsig > MaxSignals {
		return nil, 0, fmt.Errorf("number of signals %q: want 0..%d", f[1], MaxSignals)
	}
	if len(f) > 2 {
		// fs[/counterfreq[(basecounter)]]
		fs := f[2]
		cnt := ""
		if i := strings.IndexByte(fs, '/'); i >= 0 {
			fs, cnt = fs[:i], fs[i+1:]
		}
		if h.FreqHz, err = positive(fs); err != nil {
			return nil, 0, fmt.Errorf("sampling frequency: %w", err)
		}
		h.CounterFreqHz = h.FreqHz
		if cnt != "" {
			base := ""
			if i := strings.IndexByte(cnt, '('); i >= 0 {
				if !strings.HasSuffix(cnt, ")") {
					return nil, 0, fmt.Errorf("base counter %q: missing ')'", cnt)
				}
				cnt, base = cnt[:i], cnt[i+1:len(cnt)-1]
			}
			if h.CounterFreqHz, err = positive(cnt); err != nil {
				return nil, 0, fmt.Errorf("counter frequency: %w", err)
			}
			if base != "" {
				if h.BaseCounter, err = strconv.ParseFloat(base, 64); err != nil || math.IsNaN(h.BaseCounter) || math.IsInf(h.BaseCounter, 0) {
					return nil, 0, fmt.Errorf("base counter %q: not a number", base)
				}
			}
		}
	} else {
		h.CounterFreqHz = h.FreqHz
	}
	if len(f) > 3 {
		if h.NumSamples, err = strconv.ParseInt(f[3], 10, 64); err != nil || h.NumSamples < 0 {
			return nil, 0, fmt.Errorf("number of samples %q: want a non-negative integer", f[3])
		}
	}
	if len(f) > 4 {
		h.BaseTime = f[4]
	}
	if len(f) > 5 {
		h.BaseDate = f[5]
	}
	h.Signals = make([]Signal, 0, min(nsig, 64))
	return h, nsig, nil
}

func positive(s string) (float64, error) {
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || !(v > 0) || math.IsInf(v, 0) {
		return 0, fmt.Errorf("%q: want a positive number", s)
	}
	return v, nil
}

func atoi(field, s string) (int, error) {
	v, err := strconv.Atoi(s)
	if err != nil || v < math.MinInt32 || v > math.MaxInt32 {
		return 0, fmt.Errorf("%s %q: want an integer", field, s)
	}
	return v, nil
}

// parseSignalLine parses
// "file format[xspf][:skew][+offset] gain[(baseline)][/units] adcres adczero initval checksum blocksize description".
func parseSignalLine(text string) (Signal, error) {
	f := strings.Fields(text)
	if len(f) < 2 {
		return Signal{}, errors.New("want file name and format")
	}
	s := Signal{FileName: f[0], SamplesPerFrame: 1, Gain: DefaultGain, Units: "mV"}
	fmtField := f[1]
	var err error
	if i := strings.IndexByte(fmtField, '+'); i >= 0 {
		if s.ByteOffset, err = strconv.ParseInt(fmtField[i+1:], 10, 64); err != nil || s.ByteOffset < 0 {
			return s, fmt.Errorf("byte offset %q: want a non-negative integer", fmtField[i+1:])
		}
		fmtField = fmtField[:i]
	}
	if i := strings.IndexByte(fmtField, ':'); i >= 0 {
		if s.Skew, err = atoi("skew", fmtField[i+1:]); err != nil {
			return s, err
		}
		fmtField = fmtField[:i]
	}
	if i := strings.IndexByte(fmtField, 'x'); i >= 0 {
		if s.SamplesPerFrame, err = atoi("samples per frame", fmtField[i+1:]); err != nil {
			return s, err
		}
		if s.SamplesPerFrame < 1 {
			return s, fmt.Errorf("samples per frame %d: want >= 1", s.SamplesPerFrame)
		}
		fmtField = fmtField[:i]
	}
	if s.Format, err = atoi("format", fmtField); err != nil {
		return s, err
	}
	s.ADCRes = defaultRes(s.Format)
	baselineSet := false
	if len(f) > 2 {
		g := f[2]
		if i := strings.IndexByte(g, '/'); i >= 0 {
			s.Units = g[i+1:]
			g = g[:i]
		}
		if i := strings.IndexByte(g, '('); i >= 0 {
			if !strings.HasSuffix(g, ")") {
				return s, fmt.Errorf("baseline in %q: missing ')'", f[2])
			}
			if s.Baseline, err = atoi("baseline", g[i+1:len(g)-1]); err != nil {
				return s, err
			}
			baselineSet = true
			g = g[:i]
		}
		if s.Gain, err = strconv.ParseFloat(g, 64); err != nil || math.IsNaN(s.Gain) || math.IsInf(s.Gain, 0) {
			return s, fmt.Errorf("gain %q: want a number", g)
		}
		if s.Gain == 0 {
			s.Gain = DefaultGain
		}
	}
	ints := []struct {
		name string
		dst  *int
		has  *bool
	}{
		{"ADC resolution", &s.ADCRes, nil},
		{"ADC zero", &s.ADCZero, nil},
		{"initial value", &s.InitValue, &s.HasInitValue},
		{"checksum", &s.Checksum, &s.HasChecksum},
		{"block size", &s.BlockSize, nil},
	}
	for k, it := range ints {
		if len(f) <= 3+k {
			break
		}
		if *it.dst, err = atoi(it.name, f[3+k]); err != nil {
			return s, err
		}
		if it.has != nil {
			*it.has = true
		}
	}
	if s.ADCRes == 0 {
		s.ADCRes = defaultRes(s.Format)
	}
	if !baselineSet {
		s.Baseline = s.ADCZero
	}
	if len(f) > 8 {
		// The description is the rest of the line, blanks included.
		s.Description = strings.Join(f[8:], " ")
	}
	return s, nil
}

func defaultRes(format int) int {
	switch format {
	case 212:
		return 12
	case 16:
		return 16
	case 80:
		return 8
	}
	return 12
}
