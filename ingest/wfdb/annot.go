package wfdb

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// Code is an annotation type code (ecgcodes.h), 0..49 in MIT format.
type Code uint8

// Annotation codes of ecgcodes.h that Vigil names.
const (
	NotQRS   Code = 0  // not-QRS (not a beat)
	Normal   Code = 1  // N: normal beat
	LBBB     Code = 2  // L: left bundle branch block beat
	RBBB     Code = 3  // R: right bundle branch block beat
	Aberr    Code = 4  // a: aberrated atrial premature beat
	PVC      Code = 5  // V: premature ventricular contraction
	Fusion   Code = 6  // F: fusion of ventricular and normal beat
	NPC      Code = 7  // J: nodal (junctional) premature beat
	APC      Code = 8  // A: atrial premature contraction
	SVPB     Code = 9  // S: premature or ectopic supraventricular beat
	VEsc     Code = 10 // E: ventricular escape beat
	NEsc     Code = 11 // j: nodal (junctional) escape beat
	Pace     Code = 12 // /: paced beat
	Unknown  Code = 13 // Q: unclassifiable beat
	Noise    Code = 14 // ~: signal quality change
	Artifact Code = 16 // |: isolated QRS-like artifact
	Rhythm   Code = 28 // +: rhythm change (AUX holds the rhythm)
	Learn    Code = 30 // ?: learning (beat not yet classified)
	AEsc     Code = 34 // e: atrial escape beat
	SVEsc    Code = 35 // n: supraventricular escape beat
	PFus     Code = 38 // f: fusion of paced and normal beat
	BBB      Code = 25 // B: left or right bundle branch block beat
	RonT     Code = 41 // r: R-on-T premature ventricular contraction
)

// Pseudo-codes of the MIT format: they modify the annotation they follow
// (NUM, SUB, CHN, AUX) or the time of the one they precede (SKIP).
const (
	codeSkip = 59
	codeNum  = 60
	codeSub  = 61
	codeChn  = 62
	codeAux  = 63
)

// String returns the WFDB mnemonic ("N", "V", "+", ...), or "[code]".
func (c Code) String() string {
	// The WFDB annotation mnemonics by code (annot.c); a literal here
	// rather than a package variable, so that nothing can change it.
	mnemonics := [...]string{
		" ", "N", "L", "R", "a", "V", "F", "J", "A", "S", "E", "j", "/", "Q", "~", "[15]",
		"|", "[17]", "s", "T", "*", "D", "\"", "=", "p", "B", "^", "t", "+", "u", "?",
		"!", "[", "]", "e", "n", "@", "x", "f", "(", ")", "r",
	}
	if int(c) < len(mnemonics) {
		return mnemonics[c]
	}
	return fmt.Sprintf("[%d]", c)
}

// IsBeat reports whether c labels a QRS complex: N L R B A a J S V r F e j
// n E / f Q ? (the beat codes of the WFDB library's isqrs table).
func (c Code) IsBeat() bool {
	switch c {
	case Normal, LBBB, RBBB, BBB, APC, Aberr, NPC, SVPB, PVC, RonT, Fusion,
		AEsc, NEsc, SVEsc, VEsc, Pace, PFus, Unknown, Learn:
		return true
	}
	return false
}

// Annotation is one annotation of an MIT-format annotation file.
type Annotation struct {
	// Sample is the annotation's time as a sample number (frames since
	// the start of the record).
	Sample int64
	Type   Code
	// Subtype, Chan and Num as the file gives them; Chan and Num carry
	// over from the previous annotation when not set, Subtype is 0.
	Subtype, Chan, Num int
	// Aux is the auxiliary text (e.g. "(N" on a rhythm change), NULs
	// trimmed.
	Aux string
}

// AnnotationReader reads MIT-format annotations one at a time. It keeps at
// most one pending 16-bit word and one AUX string (<= 1023 bytes); not safe
// for concurrent use.
type AnnotationReader struct {
	r        *bufio.Reader
	t        int64
	chn, num int
	pend     uint16
	havePend bool
	done     bool
	aux      [1024]byte
}

// NewAnnotationReader reads annotations from r.
func NewAnnotationReader(r io.Reader) *AnnotationReader {
	return &AnnotationReader{r: bufio.NewReaderSize(r, 4096)}
}

// errTruncated is returned for a file that ends inside a field.
var errTruncated = errors.New("annotation file ends inside an annotation")

func (a *AnnotationReader) word() (uint16, error) {
	if a.havePend {
		a.havePend = false
		return a.pend, nil
	}
	var b [2]byte
	n, err := io.ReadFull(a.r, b[:])
	if n == 1 {
		return 0, errTruncated
	}
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint16(b[:]), nil
}

// Next returns the next annotation, or io.EOF after the last one (end
// marker or end of input). Malformed input yields an error naming the
// problem; the reader is then done.
func (a *AnnotationReader) Next() (Annotation, error) {
	if a.done {
		return Annotation{}, io.EOF
	}
	ann, err := a.next()
	if err != nil {
		a.done = true
	}
	return ann, err
}

func (a *AnnotationReader) next() (Annotation, error) {
	w, err := a.word()
	if err != nil {
		return Annotation{}, err
	}
	for w>>10 == codeSkip {
		var b [4]byte
		if _, err := io.ReadFull(a.r, b[:]); err != nil {
			return Annotation{}, fmt.Errorf("reading SKIP interval: %w", errTruncated)
		}
		// PDP-11 long: high 16-bit word first, each word little-endian.
		skip := int32(uint32(b[0])<<16 | uint32(b[1])<<24 | uint32(b[2]) | uint32(b[3])<<8)
		a.t += int64(skip)
		if w, err = a.word(); err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("SKIP without annotation: %w", errTruncated)
			}
			return Annotation{}, err
		}
	}
	if w == 0 {
		return Annotation{}, io.EOF
	}
	code := w >> 10
	if code > codeSkip {
		return Annotation{}, fmt.Errorf("malformed annotation file: modifier %d before any annotation", code)
	}
	a.t += int64(w & 0x3ff)
	ann := Annotation{Sample: a.t, Type: Code(code), Chan: a.chn, Num: a.num}
	for {
		w, err := a.word()
		if errors.Is(err, io.EOF) {
			a.done = true // end of input without an end marker
			break
		}
		if err != nil {
			return Annotation{}, err
		}
		data := int(w & 0x3ff)
		switch w >> 10 {
		case codeNum:
			ann.Num = data
		case codeSub:
			ann.Subtype = data
		case codeChn:
			ann.Chan = data
		case codeAux:
			n := data + data&1 // padded to an even length
			if _, err := io.ReadFull(a.r, a.aux[:n]); err != nil {
				return Annotation{}, fmt.Errorf("reading AUX string: %w", errTruncated)
			}
			ann.Aux = strings.TrimRight(string(a.aux[:data]), "\x00")
		default:
			a.pend, a.havePend = w, true
			a.chn, a.num = ann.Chan, ann.Num
			return ann, nil
		}
	}
	a.chn, a.num = ann.Chan, ann.Num
	return ann, nil
}

// ReadAnnotations reads dir/record.ext (e.g. ext "atr") up to max
// annotations (max <= 0: no limit but the file's size, 2 bytes at least per
// annotation).
func ReadAnnotations(dir, record, ext string, max int) ([]Annotation, error) {
	f, err := os.Open(filepath.Join(dir, record+"."+ext))
	if err != nil {
		return nil, fmt.Errorf("opening annotation file: %w", err)
	}
	defer f.Close()
	r := NewAnnotationReader(f)
	var out []Annotation
	for max <= 0 || len(out) < max {
		a, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return out, fmt.Errorf("reading annotations of %s: %w", record, err)
		}
		out = append(out, a)
	}
	return out, nil
}
