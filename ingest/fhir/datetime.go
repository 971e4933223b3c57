package fhir

import (
	"fmt"
	"time"
)

// precision is how much of a FHIR dateTime was given.
type precision int

const (
	precYear precision = iota + 1
	precMonth
	precDay
	precTime
)

func (p precision) String() string {
	switch p {
	case precYear:
		return "year"
	case precMonth:
		return "month"
	case precDay:
		return "day"
	}
	return "time"
}

// parseDateTime parses a FHIR R4 dateTime (YYYY, YYYY-MM, YYYY-MM-DD or
// YYYY-MM-DDThh:mm:ss[.fraction](Z|+hh:mm|-hh:mm)) into Unix epoch
// milliseconds UTC of its start, and says how precise it was. A time of day
// requires a time zone (R4: "If hours and minutes are specified, a time zone
// SHALL be populated"). Hand-written because time.Parse has no layout for
// FHIR's partial precision, and RFC 3339 parsing accepts more than FHIR
// allows. It does not allocate on success.
func parseDateTime(s string) (int64, precision, error) {
	bad := func(why string) (int64, precision, error) {
		return 0, 0, fmt.Errorf("%q is not a FHIR dateTime: %s (want e.g. 2024-05-01T10:30:00+02:00)", clip(s), why)
	}
	num := func(i, n int) (int, bool) {
		if i+n > len(s) {
			return 0, false
		}
		v := 0
		for _, c := range []byte(s[i : i+n]) {
			if c < '0' || c > '9' {
				return 0, false
			}
			v = v*10 + int(c-'0')
		}
		return v, true
	}
	year, ok := num(0, 4)
	if !ok || year == 0 {
		return bad("the year must be 4 digits, 0001 to 9999")
	}
	if len(s) == 4 {
		return time.Date(year, 1, 1, 0, 0, 0, 0, time.UTC).UnixMilli(), precYear, nil
	}
	if s[4] != '-' {
		return bad("'-' expected after the year")
	}
	month, ok := num(5, 2)
	if !ok || month < 1 || month > 12 {
		return bad("the month must be 01 to 12")
	}
	if len(s) == 7 {
		return time.Date(year, time.Month(month), 1, 0, 0, 0, 0, time.UTC).UnixMilli(), precMonth, nil
	}
	if len(s) < 10 || s[7] != '-' {
		return bad("'-' expected after the month")
	}
	day, ok := num(8, 2)
	if !ok || day < 1 || day > daysIn(year, month) {
		return bad("no such day")
	}
	if len(s) == 10 {
		return time.Date(year, time.Month(month), day, 0, 0, 0, 0, time.UTC).UnixMilli(), precDay, nil
	}
	if s[10] != 'T' {
		return bad("'T' expected after the date")
	}
	hour, ok1 := num(11, 2)
	minute, ok2 := num(14, 2)
	sec, ok3 := num(17, 2)
	if !ok1 || !ok2 || !ok3 || len(s) < 19 || s[13] != ':' || s[16] != ':' {
		return bad("the time must be hh:mm:ss")
	}
	if hour > 23 || minute > 59 || sec > 60 {
		return bad("the time is out of range")
	}
	i := 19
	nanos := 0
	if i < len(s) && s[i] == '.' {
		i++
		start := i
		scale := 100000000
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			if i-start >= 9 {
				return bad("at most 9 fractional digits")
			}
			nanos += int(s[i]-'0') * scale
			scale /= 10
			i++
		}
		if i == start {
			return bad("digits expected after '.'")
		}
	}
	if i == len(s) {
		return bad("a time of day needs a time zone (Z or +hh:mm)")
	}
	offset := 0
	switch s[i] {
	case 'Z':
		if i+1 != len(s) {
			return bad("unexpected text after 'Z'")
		}
	case '+', '-':
		oh, ok1 := num(i+1, 2)
		om, ok2 := num(i+4, 2)
		if !ok1 || !ok2 || i+6 != len(s) || s[i+3] != ':' || oh > 14 || om > 59 {
			return bad("the time zone must be Z or ±hh:mm")
		}
		offset = oh*3600 + om*60
		if s[i] == '-' {
			offset = -offset
		}
	default:
		return bad("the time zone must be Z or ±hh:mm")
	}
	t := time.Date(year, time.Month(month), day, hour, minute, sec, nanos, time.UTC)
	return t.UnixMilli() - int64(offset)*1000, precTime, nil
}

func daysIn(year, month int) int {
	return time.Date(year, time.Month(month)+1, 0, 0, 0, 0, 0, time.UTC).Day()
}

// clip bounds an echoed value so messages stay short.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
