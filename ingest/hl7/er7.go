package hl7

// The ER7 ("pipe and hat") parser is hand-written. The Go HL7 v2 libraries
// found (github.com/lenaten/hl7, github.com/kardianos/hl7 and a few forks)
// are unmaintained, copy every field into its own string or map while
// parsing, do not handle all escape sequences (\Xhh\, \.br\) or custom
// encoding characters consistently, and have not been fuzzed against
// hostile input. Vigil needs a parser that reads thousands of messages a
// second and must never panic or allocate without bound on whatever a
// socket delivers, so this one indexes the message in place: one pass
// records where every segment and field starts (one []int32 for the whole
// message), and fields, repetitions, components and sub-components are
// sliced out of the original bytes only when asked for. Escape sequences
// are decoded on demand (String), with a fast path for the common case of
// none.

import (
	"bytes"
	"fmt"
	"math"
	"strconv"
	"unicode/utf8"
)

// Delims are a message's encoding characters, from MSH-1 and MSH-2.
type Delims struct {
	Field, Component, Repetition, Escape, Subcomponent byte
	// Truncation is the HL7 v2.7+ truncation character (MSH-2.5), 0 when
	// absent. It is not interpreted, only recognised as part of MSH-2.
	Truncation byte
}

// DefaultDelims are the encoding characters almost every sender uses:
// |^~\&.
var DefaultDelims = Delims{Field: '|', Component: '^', Repetition: '~', Escape: '\\', Subcomponent: '&'}

// HL7 error condition codes (HL7 table 0357), as written in ERR-3.
const (
	CodeSegmentSequence    = "100"
	CodeRequiredMissing    = "101"
	CodeDataType           = "102"
	CodeTableValue         = "103"
	CodeUnsupportedType    = "200"
	CodeUnsupportedEvent   = "201"
	CodeUnsupportedProcID  = "202"
	CodeUnsupportedVersion = "203"
	CodeUnknownKey         = "204"
	CodeDuplicateKey       = "205"
	CodeInternalError      = "207"
)

// ParseError is why a message could not be parsed, located like an HL7 ERR
// segment: segment id, its occurrence (1-based, 0 when unknown) and field
// position (0 when the whole segment is at fault).
type ParseError struct {
	Segment  string
	Sequence int
	Field    int
	// Code is the HL7 table 0357 error code.
	Code    string
	Message string
}

// Error returns "MSH[1]-9: message".
func (e *ParseError) Error() string {
	loc := e.Segment
	if loc == "" {
		loc = "message"
	}
	if e.Sequence > 0 {
		loc += "[" + strconv.Itoa(e.Sequence) + "]"
	}
	if e.Field > 0 {
		loc += "-" + strconv.Itoa(e.Field)
	}
	return loc + ": " + e.Message
}

// Message is a parsed HL7 v2 message. It references the bytes given to Parse
// (which the caller must not modify while the Message is in use); it is
// immutable and safe for concurrent reads.
type Message struct {
	// Delims are the message's encoding characters.
	Delims Delims
	raw    []byte
	segs   []segment
	// offs holds, per segment, the positions of its field separators
	// followed by the segment's end.
	offs []int32
}

type segment struct {
	start, end int32 // raw[start:end] is the segment text
	fo, fn     int32 // offs[fo:fo+fn] are its separators, offs[fo+fn] its end
	occ        int32 // occurrence of this segment id in the message, 1-based
}

// Limits on what Parse accepts, so that hostile input cannot make it
// allocate without bound: both are far above anything a real message has.
const (
	// MaxSegments bounds the segments of one message.
	MaxSegments = 100_000
	// MaxParseBytes bounds the size of one message (the MLLP listener's
	// own bound is usually much lower).
	MaxParseBytes = 64 << 20
)

// utf8BOM is stripped from the start of a message (files written by Windows
// tools start with it).
var utf8BOM = []byte{0xEF, 0xBB, 0xBF}

// Parse indexes data as one HL7 v2 message in ER7 encoding. Segments may be
// separated by \r (the standard), \n or \r\n; blank lines, a UTF-8 byte
// order mark and leading NUL or whitespace bytes are skipped. The message
// keeps data (no copy). Errors are *ParseError.
//
// Parse checks the syntax only: an MSH segment first, with valid and
// distinct encoding characters, and well-formed segment ids. What a message
// type requires is checked by its decoder.
func Parse(data []byte) (*Message, error) {
	if len(data) > MaxParseBytes {
		return nil, &ParseError{Code: CodeInternalError, Message: fmt.Sprintf("message is %d bytes long (at most %d)", len(data), MaxParseBytes)}
	}
	start := 0
	for {
		if bytes.HasPrefix(data[start:], utf8BOM) {
			start += len(utf8BOM)
			continue
		}
		if start < len(data) && (data[start] == 0 || data[start] == '\r' || data[start] == '\n' || data[start] == ' ' || data[start] == '\t') {
			start++
			continue
		}
		break
	}
	d := data[start:]
	if len(d) < 8 || string(d[:3]) != "MSH" {
		return nil, &ParseError{Segment: "MSH", Sequence: 1, Code: CodeSegmentSequence, Message: "message does not start with an MSH segment"}
	}
	m := &Message{raw: data}
	if err := m.delims(d); err != nil {
		return nil, err
	}
	// Count segments first so that segs and offs are allocated once.
	nseg, nsep := 0, 0
	fs := m.Delims.Field
	for _, c := range d {
		switch c {
		case '\r', '\n':
			nseg++
		case fs:
			nsep++
		}
	}
	nseg++
	if nseg > MaxSegments {
		nseg = MaxSegments + 1
	}
	m.segs = make([]segment, 0, nseg)
	m.offs = make([]int32, 0, nsep+nseg)
	occ := map[[3]byte]int32{}
	pos := start
	for pos < len(data) {
		end := pos
		for end < len(data) && data[end] != '\r' && data[end] != '\n' {
			end++
		}
		if end > pos {
			if err := m.addSegment(int32(pos), int32(end), occ); err != nil {
				return nil, err
			}
		}
		pos = end + 1
	}
	return m, nil
}

func (m *Message) delims(d []byte) error {
	fs := d[3]
	if !isDelim(fs) {
		return &ParseError{Segment: "MSH", Sequence: 1, Field: 1, Code: CodeDataType, Message: fmt.Sprintf("field separator %q is not a valid delimiter", fs)}
	}
	enc := d[4:]
	if i := bytes.IndexByte(enc, fs); i >= 0 {
		enc = enc[:i]
	} else if i := bytes.IndexAny(enc, "\r\n"); i >= 0 {
		enc = enc[:i]
	}
	if len(enc) < 1 || len(enc) > 5 {
		return &ParseError{Segment: "MSH", Sequence: 1, Field: 2, Code: CodeDataType, Message: fmt.Sprintf("encoding characters %q: want 1 to 5 characters such as ^~\\&", enc)}
	}
	dl := Delims{Field: fs, Component: enc[0], Repetition: '~', Subcomponent: '&'}
	if len(enc) > 1 {
		dl.Repetition = enc[1]
	}
	if len(enc) > 2 {
		dl.Escape = enc[2]
	}
	if len(enc) > 3 {
		dl.Subcomponent = enc[3]
	}
	if len(enc) > 4 {
		dl.Truncation = enc[4]
	}
	var seen [256]bool
	seen[fs] = true
	for _, c := range enc {
		if !isDelim(c) || seen[c] {
			return &ParseError{Segment: "MSH", Sequence: 1, Field: 2, Code: CodeDataType, Message: fmt.Sprintf("encoding characters %q: %q is repeated or not a valid delimiter", enc, c)}
		}
		seen[c] = true
	}
	m.Delims = dl
	return nil
}

// isDelim reports whether c may serve as an encoding character: printable
// ASCII punctuation.
func isDelim(c byte) bool {
	return c > ' ' && c < 0x7f && !(c >= '0' && c <= '9') && !(c >= 'A' && c <= 'Z') && !(c >= 'a' && c <= 'z')
}

func (m *Message) addSegment(start, end int32, occ map[[3]byte]int32) error {
	raw := m.raw[start:end]
	// Trailing spaces and NULs are noise some senders leave.
	for len(raw) > 0 && (raw[len(raw)-1] == ' ' || raw[len(raw)-1] == 0 || raw[len(raw)-1] == '\t') {
		raw = raw[:len(raw)-1]
		end--
	}
	if len(raw) == 0 {
		return nil
	}
	seq := len(m.segs) + 1
	if len(m.segs) >= MaxSegments {
		return &ParseError{Sequence: seq, Code: CodeSegmentSequence, Message: fmt.Sprintf("more than %d segments", MaxSegments)}
	}
	fs := m.Delims.Field
	if len(raw) < 3 || (len(raw) > 3 && raw[3] != fs) || !isSegID(raw[:3]) {
		return &ParseError{Sequence: seq, Code: CodeSegmentSequence,
			Message: fmt.Sprintf("segment %d does not start with a segment id (three upper-case letters or digits) followed by %q: %q", seq, fs, clipBytes(raw, 20))}
	}
	var id [3]byte
	copy(id[:], raw[:3])
	if seq > 1 && id == [3]byte{'M', 'S', 'H'} {
		return &ParseError{Segment: "MSH", Sequence: 2, Code: CodeSegmentSequence, Message: "a second MSH segment: one message per frame"}
	}
	occ[id]++
	s := segment{start: start, end: end, fo: int32(len(m.offs)), occ: occ[id]}
	for i := 3; i < len(raw); i++ {
		if raw[i] == fs {
			m.offs = append(m.offs, start+int32(i))
		}
	}
	s.fn = int32(len(m.offs)) - s.fo
	m.offs = append(m.offs, end)
	m.segs = append(m.segs, s)
	return nil
}

func isSegID(b []byte) bool {
	if !(b[0] >= 'A' && b[0] <= 'Z') {
		return false
	}
	for _, c := range b[1:3] {
		if !(c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

func clipBytes(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// Raw returns the bytes the message was parsed from (owned by the caller of
// Parse).
func (m *Message) Raw() []byte { return m.raw }

// Len is the number of segments.
func (m *Message) Len() int { return len(m.segs) }

// Segment returns the i-th segment (0-based).
func (m *Message) Segment(i int) Segment { return Segment{m: m, i: i} }

// First returns the first segment with the given id.
func (m *Message) First(id string) (Segment, bool) {
	for i := range m.segs {
		if s := m.Segment(i); s.Is(id) {
			return s, true
		}
	}
	return Segment{}, false
}

// MSH returns the message header (always the first segment).
func (m *Message) MSH() Segment { return m.Segment(0) }

// Segment is one segment of a Message; the zero Segment has no fields.
type Segment struct {
	m *Message
	i int
}

// Valid reports whether s is a segment of a message.
func (s Segment) Valid() bool { return s.m != nil }

// Index is the segment's position in the message (0-based).
func (s Segment) Index() int { return s.i }

// Occurrence is how many segments with this id came before it, plus one:
// the "segment sequence" of an HL7 error location.
func (s Segment) Occurrence() int {
	if s.m == nil {
		return 0
	}
	return int(s.m.segs[s.i].occ)
}

// Is reports whether the segment's id is id.
func (s Segment) Is(id string) bool {
	if s.m == nil || len(id) != 3 {
		return false
	}
	st := s.m.segs[s.i].start
	return string(s.m.raw[st:st+3]) == id
}

// ID returns the segment id, e.g. "OBX".
func (s Segment) ID() string {
	if s.m == nil {
		return ""
	}
	st := s.m.segs[s.i].start
	b := s.m.raw[st : st+3]
	for _, known := range knownIDs {
		if string(b) == known {
			return known
		}
	}
	return string(b)
}

// knownIDs are returned without allocating.
var knownIDs = [...]string{"MSH", "PID", "PV1", "OBR", "OBX", "EVN", "NTE", "ORC", "PD1", "PV2", "MSA", "ERR", "SPM", "NK1", "AL1", "DG1"}

// Raw returns the segment's text.
func (s Segment) Raw() []byte {
	if s.m == nil {
		return nil
	}
	sg := s.m.segs[s.i]
	return s.m.raw[sg.start:sg.end]
}

// NumFields is the number of fields present (the highest field position
// that is not past the end of the segment).
func (s Segment) NumFields() int {
	if s.m == nil {
		return 0
	}
	n := int(s.m.segs[s.i].fn)
	if s.Is("MSH") {
		n++ // MSH-1 is the field separator itself
	}
	return n
}

// Field returns field n (1-based, as HL7 numbers them: PID-3 is Field(3);
// for MSH, Field(1) is the field separator and Field(2) the encoding
// characters). A field past the end of the segment is empty.
func (s Segment) Field(n int) Field {
	if s.m == nil || n < 1 {
		return Field{}
	}
	sg := s.m.segs[s.i]
	d := &s.m.Delims
	if s.Is("MSH") {
		if n == 1 {
			sep := sg.start + 3
			return Field{b: s.m.raw[sep : sep+1], d: d, literal: true}
		}
		n--
		if n == 1 {
			// MSH-2 holds the encoding characters: never split or
			// unescaped.
			return Field{b: s.m.raw[s.m.offs[sg.fo]+1 : s.m.offs[sg.fo+1]], d: d, literal: true}
		}
	}
	if n > int(sg.fn) {
		return Field{d: d}
	}
	from := s.m.offs[sg.fo+int32(n)-1] + 1
	to := s.m.offs[sg.fo+int32(n)]
	return Field{b: s.m.raw[from:to], d: d}
}

// Field is a field, a repetition, a component or a sub-component: a slice of
// the message's bytes still in ER7 encoding. The zero Field is empty.
type Field struct {
	b       []byte
	d       *Delims
	literal bool
}

// Raw returns the encoded bytes (escape sequences not decoded).
func (f Field) Raw() []byte { return f.b }

// Empty reports whether the field has no value (HL7's explicit null `""`
// counts as empty).
func (f Field) Empty() bool {
	return len(f.b) == 0 || (len(f.b) == 2 && f.b[0] == '"' && f.b[1] == '"')
}

// Reps is the number of repetitions (0 for an empty field).
func (f Field) Reps() int {
	if len(f.b) == 0 {
		return 0
	}
	if f.literal || f.d == nil {
		return 1
	}
	return bytes.Count(f.b, []byte{f.d.Repetition}) + 1
}

// Rep returns repetition n (0-based).
func (f Field) Rep(n int) Field {
	if f.literal || f.d == nil {
		if n == 0 {
			return f
		}
		return Field{d: f.d}
	}
	return Field{b: nth(f.b, f.d.Repetition, n), d: f.d}
}

// Component returns component n (1-based) of the field's first
// repetition. Component(1) of a field without components is the field.
func (f Field) Component(n int) Field {
	if f.literal || f.d == nil {
		if n == 1 {
			return f
		}
		return Field{d: f.d}
	}
	first := nth(f.b, f.d.Repetition, 0)
	return Field{b: nth(first, f.d.Component, n-1), d: f.d}
}

// Sub returns sub-component n (1-based) of the field's first component.
func (f Field) Sub(n int) Field {
	if f.literal || f.d == nil {
		if n == 1 {
			return f
		}
		return Field{d: f.d}
	}
	c := f.Component(1)
	return Field{b: nth(c.b, f.d.Subcomponent, n-1), d: f.d}
}

// nth returns the n-th (0-based) piece of b split at sep.
func nth(b []byte, sep byte, n int) []byte {
	for ; n > 0; n-- {
		i := bytes.IndexByte(b, sep)
		if i < 0 {
			return nil
		}
		b = b[i+1:]
	}
	if i := bytes.IndexByte(b, sep); i >= 0 {
		return b[:i]
	}
	return b
}

// String returns the value with escape sequences decoded. Use it on a
// leaf (a component or sub-component, or a field without them): the
// separators inside are kept as they are.
func (f Field) String() string {
	if f.Empty() {
		return ""
	}
	if f.literal || f.d == nil || f.d.Escape == 0 || bytes.IndexByte(f.b, f.d.Escape) < 0 {
		return string(f.b)
	}
	return string(Unescape(f.b, f.d))
}

// Unescape decodes the escape sequences of one ER7 value: \F\ \S\ \T\ \R\
// \E\ (the delimiters), \Xhh...\ (bytes in hex), \.br\ (line break), and
// drops formatting and character-set escapes (\H\ \N\ \.sp\ \Cxxyy\
// \Mxxyyzz\ \Zxx\). An escape character without a closing one is kept
// literally. The result is a new slice; invalid UTF-8 produced by \X\ is
// replaced by U+FFFD.
func Unescape(b []byte, d *Delims) []byte {
	e := d.Escape
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); i++ {
		c := b[i]
		if c != e {
			out = append(out, c)
			continue
		}
		j := bytes.IndexByte(b[i+1:], e)
		if j < 0 {
			out = append(out, b[i:]...)
			break
		}
		seq := b[i+1 : i+1+j]
		i += j + 1
		switch {
		case len(seq) == 1 && seq[0] == 'F':
			out = append(out, d.Field)
		case len(seq) == 1 && seq[0] == 'S':
			out = append(out, d.Component)
		case len(seq) == 1 && seq[0] == 'T':
			out = append(out, d.Subcomponent)
		case len(seq) == 1 && seq[0] == 'R':
			out = append(out, d.Repetition)
		case len(seq) == 1 && seq[0] == 'E':
			out = append(out, e)
		case len(seq) == 1 && d.Truncation != 0 && seq[0] == 'P':
			out = append(out, d.Truncation)
		case len(seq) >= 1 && seq[0] == 'X':
			hex := seq[1:]
			for k := 0; k+1 < len(hex); k += 2 {
				hi, ok1 := unhex(hex[k])
				lo, ok2 := unhex(hex[k+1])
				if !ok1 || !ok2 {
					break
				}
				out = append(out, hi<<4|lo)
			}
		case string(seq) == ".br":
			out = append(out, '\n')
		case len(seq) >= 1 && (seq[0] == 'H' || seq[0] == 'N' || seq[0] == 'C' || seq[0] == 'M' || seq[0] == 'Z' || seq[0] == '.'):
			// formatting / character set: no text
		case len(seq) == 0:
			// "\\": an empty escape, nothing
		default:
			out = append(out, e)
			out = append(out, seq...)
			out = append(out, e)
		}
	}
	if !utf8.Valid(out) {
		out = bytes.ToValidUTF8(out, []byte("\uFFFD"))
	}
	return out
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// Escape appends s to dst with the delimiters of d (and control characters)
// escaped, so that s can be written as one ER7 leaf value.
func Escape(dst []byte, s string, d *Delims) []byte {
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == d.Escape && d.Escape != 0:
			dst = append(dst, d.Escape, 'E', d.Escape)
		case c == d.Field:
			dst = append(dst, d.Escape, 'F', d.Escape)
		case c == d.Component:
			dst = append(dst, d.Escape, 'S', d.Escape)
		case c == d.Subcomponent:
			dst = append(dst, d.Escape, 'T', d.Escape)
		case c == d.Repetition:
			dst = append(dst, d.Escape, 'R', d.Escape)
		case c == '\r' || c == '\n':
			dst = append(dst, d.Escape, '.', 'b', 'r', d.Escape)
		case c < 0x20 || c == 0x7f:
			const hexd = "0123456789ABCDEF"
			dst = append(dst, d.Escape, 'X', hexd[c>>4], hexd[c&15], d.Escape)
		default:
			dst = append(dst, c)
		}
	}
	return dst
}

// ParseNumber parses an HL7 NM value: optional leading sign, digits and an
// optional decimal point, surrounded by optional spaces. It refuses
// exponents, hex, "NaN" and "Inf", which NM does not allow.
func ParseNumber(b []byte) (float64, bool) {
	b = bytes.TrimSpace(b)
	if len(b) == 0 || len(b) > 64 {
		return 0, false
	}
	digits, dots := 0, 0
	for i, c := range b {
		switch {
		case c >= '0' && c <= '9':
			digits++
		case c == '.':
			dots++
		case (c == '+' || c == '-') && i == 0:
		default:
			return 0, false
		}
	}
	if digits == 0 || dots > 1 {
		return 0, false
	}
	v, err := strconv.ParseFloat(string(b), 64)
	if err != nil || math.IsInf(v, 0) {
		return 0, false
	}
	return v, true
}
