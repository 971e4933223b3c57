package hl7

import (
	"bytes"
	"fmt"
	"time"
)

// ParseTime parses an HL7 TS/DTM value, YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]]
// [+/-ZZZZ], into Unix epoch milliseconds UTC. Missing parts take their
// lowest value (a date alone is its midnight); a value without a UTC offset
// is read in loc (UTC when nil). Only the first component is read, so a
// v2.3 TS with a precision component ("20240101^S") works too. The
// fraction is kept to the millisecond.
func ParseTime(b []byte, loc *time.Location) (int64, error) {
	if i := bytes.IndexAny(b, "^~&"); i >= 0 {
		b = b[:i]
	}
	b = bytes.TrimSpace(b)
	if len(b) < 4 {
		return 0, fmt.Errorf("time %q: want at least a year (YYYY)", b)
	}
	// Split off the offset.
	var off []byte
	if i := bytes.IndexAny(b, "+-"); i >= 0 {
		off = b[i:]
		b = b[:i]
	}
	var frac []byte
	if i := bytes.IndexByte(b, '.'); i >= 0 {
		frac = b[i+1:]
		b = b[:i]
		if len(b) != 14 {
			return 0, fmt.Errorf("time %q: a fraction of a second needs seconds (YYYYMMDDHHMMSS.S)", b)
		}
		if len(frac) == 0 || len(frac) > 4 || !allDigits(frac) {
			return 0, fmt.Errorf("time fraction %q: want 1 to 4 digits", frac)
		}
	}
	switch len(b) {
	case 4, 6, 8, 10, 12, 14:
	default:
		return 0, fmt.Errorf("time %q: want YYYY[MM[DD[HH[MM[SS]]]]]", b)
	}
	if !allDigits(b) {
		return 0, fmt.Errorf("time %q: not all digits", b)
	}
	num := func(s []byte) int {
		n := 0
		for _, c := range s {
			n = n*10 + int(c-'0')
		}
		return n
	}
	year, month, day, hour, minute, sec := num(b[:4]), 1, 1, 0, 0, 0
	if len(b) >= 6 {
		month = num(b[4:6])
	}
	if len(b) >= 8 {
		day = num(b[6:8])
	}
	if len(b) >= 10 {
		hour = num(b[8:10])
	}
	if len(b) >= 12 {
		minute = num(b[10:12])
	}
	if len(b) >= 14 {
		sec = num(b[12:14])
	}
	if month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || sec > 60 {
		return 0, fmt.Errorf("time %q: a part is out of range", b)
	}
	ms := 0
	if len(frac) > 0 {
		f := num(frac)
		for i := len(frac); i < 4; i++ {
			f *= 10
		}
		ms = f / 10
	}
	if loc == nil {
		loc = time.UTC
	}
	if off != nil {
		if len(off) != 5 || !allDigits(off[1:]) {
			return 0, fmt.Errorf("time zone offset %q: want +HHMM or -HHMM", off)
		}
		h, m := num(off[1:3]), num(off[3:5])
		if h > 14 || m > 59 {
			return 0, fmt.Errorf("time zone offset %q is out of range", off)
		}
		secs := h*3600 + m*60
		if off[0] == '-' {
			secs = -secs
		}
		loc = time.FixedZone("", secs)
	}
	t := time.Date(year, time.Month(month), day, hour, minute, sec, ms*int(time.Millisecond), loc)
	if t.Day() != day {
		return 0, fmt.Errorf("time %q: day %d does not exist in that month", b, day)
	}
	return t.UnixMilli(), nil
}

func allDigits(b []byte) bool {
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// FormatTime formats t as an HL7 DTM with milliseconds and UTC offset
// (YYYYMMDDHHMMSS.SSS+0000), for ACKs.
func FormatTime(t time.Time) string {
	return t.UTC().Format("20060102150405.000-0700")
}
