package replay

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
)

// PSV is the PhysioNet/Computing in Cardiology Challenge 2019 (early
// prediction of sepsis) file format: one file per ICU stay, a header line of
// column names separated by '|', then one row per ICU hour, "NaN" for an
// empty cell. The reader here is hand-written (a '|' split and ParseFloat)
// because encoding/csv allocates a string per cell and would dominate the
// cost of a 20,000-file replay.

// MaxPSVLine bounds one PSV line in bytes; a longer line fails the file.
const MaxPSVLine = 64 << 10

// MaxPSVColumns bounds the columns of a PSV header.
const MaxPSVColumns = 256

// PSVVital maps a PSV vital-sign column onto a catalogue metric.
type PSVVital struct {
	// Column is the PSV header name, e.g. "HR".
	Column string
	// Metric is the catalogue id, e.g. "heart_rate".
	Metric string
	// Unit is the UCUM unit of the column's values (validation converts
	// it to the metric's canonical unit, e.g. FiO2 "1" → %).
	Unit string
}

// PSVVitals returns the vital-sign columns of the 2019 challenge that map
// onto catalogue metrics (a fresh slice; callers may modify it). EtCO2 is a
// vital sign without a catalogue metric; it is counted, not sent.
func PSVVitals() []PSVVital {
	return []PSVVital{
		{"HR", "heart_rate", "/min"},
		{"O2Sat", "spo2", "%"},
		{"Temp", "body_temperature", "Cel"},
		{"SBP", "systolic_bp", "mm[Hg]"},
		{"MAP", "mean_arterial_pressure", "mm[Hg]"},
		{"DBP", "diastolic_bp", "mm[Hg]"},
		{"Resp", "respiratory_rate", "/min"},
		{"FiO2", "fio2", "1"}, // a fraction in the challenge data
	}
}

// psvKind classifies a PSV column.
type psvKind uint8

const (
	psvOther    psvKind = iota // demographics, labels: neither sent nor counted
	psvVital                   // mapped onto a metric
	psvUnmapped                // a vital sign with no catalogue metric (EtCO2)
	psvLab                     // a laboratory value: skipped, counted
	psvICULOS                  // hours since ICU admission (the time axis)
)

// psvColumnKind returns the kind of a challenge column name that is not a
// mapped vital.
func psvColumnKind(name string) psvKind {
	switch name {
	case "EtCO2":
		return psvUnmapped
	case "BaseExcess", "HCO3", "pH", "PaCO2", "SaO2", "AST", "BUN", "Alkalinephos", "Calcium", "Chloride",
		"Creatinine", "Bilirubin_direct", "Glucose", "Lactate", "Magnesium", "Phosphate", "Potassium",
		"Bilirubin_total", "TroponinI", "Hct", "Hgb", "PTT", "WBC", "Fibrinogen", "Platelets":
		return psvLab
	case "ICULOS":
		return psvICULOS
	}
	return psvOther
}

// PSVHeader is a parsed PSV header line.
type PSVHeader struct {
	// Columns are the names in file order.
	Columns []string
	// ICULOS is the index of the ICULOS column.
	ICULOS int
	// Vitals are the mapped vital columns present, with their index.
	Vitals []PSVColumn
	kinds  []psvKind
}

// PSVColumn is a mapped vital column of a header.
type PSVColumn struct {
	Index int
	PSVVital
}

// ParsePSVHeader parses a header line (without its line end). It fails when
// the line has no ICULOS column, a duplicate or empty column name, or more
// than MaxPSVColumns columns.
func ParsePSVHeader(line []byte) (*PSVHeader, error) {
	line = bytes.TrimSuffix(line, []byte("\r"))
	names := bytes.Split(line, []byte("|"))
	if len(names) > MaxPSVColumns {
		return nil, fmt.Errorf("parsing psv header: %d columns (at most %d)", len(names), MaxPSVColumns)
	}
	vitals := map[string]PSVVital{}
	for _, v := range PSVVitals() {
		vitals[v.Column] = v
	}
	h := &PSVHeader{ICULOS: -1, kinds: make([]psvKind, len(names))}
	seen := map[string]bool{}
	for i, nb := range names {
		name := string(nb)
		if name == "" {
			return nil, fmt.Errorf("parsing psv header: column %d has no name", i+1)
		}
		if seen[name] {
			return nil, fmt.Errorf("parsing psv header: column %q appears twice", name)
		}
		seen[name] = true
		h.Columns = append(h.Columns, name)
		if v, ok := vitals[name]; ok {
			h.kinds[i] = psvVital
			h.Vitals = append(h.Vitals, PSVColumn{Index: i, PSVVital: v})
			continue
		}
		h.kinds[i] = psvColumnKind(name)
		if h.kinds[i] == psvICULOS {
			h.ICULOS = i
		}
	}
	if h.ICULOS < 0 {
		return nil, errors.New("parsing psv header: no ICULOS column (hours since ICU admission), so rows have no time")
	}
	return h, nil
}

// ParsePSVLine parses one data line (without its line end) into dst, which
// must have exactly one entry per header column; "NaN" (and an empty cell)
// becomes math.NaN(). It fails on a wrong number of cells or a cell that is
// not a decimal number. It does not allocate on success.
func ParsePSVLine(line []byte, dst []float64) error {
	line = bytes.TrimSuffix(line, []byte("\r"))
	i := 0
	for {
		end := bytes.IndexByte(line, '|')
		cell := line
		if end >= 0 {
			cell = line[:end]
		}
		if i == len(dst) {
			return fmt.Errorf("more than %d cells", len(dst))
		}
		v, err := parseCell(cell)
		if err != nil {
			return fmt.Errorf("cell %d: %w", i+1, err)
		}
		dst[i] = v
		i++
		if end < 0 {
			break
		}
		line = line[end+1:]
	}
	if i != len(dst) {
		return fmt.Errorf("%d cells, want %d", i, len(dst))
	}
	return nil
}

func parseCell(cell []byte) (float64, error) {
	if len(cell) == 0 || string(cell) == "NaN" || string(cell) == "nan" {
		return math.NaN(), nil
	}
	v, err := strconv.ParseFloat(string(cell), 64)
	if err != nil || math.IsInf(v, 0) || math.IsNaN(v) {
		return 0, fmt.Errorf("%q is not a finite decimal number", clip(cell))
	}
	return v, nil
}

// PSVRow is one parsed data row. Values has one entry per header column
// and, like Line, is owned by the reader and valid until the next call.
type PSVRow struct {
	// Number is the 1-based row number (the header is row 0).
	Number int
	// Line is the row's text, without the line end.
	Line   []byte
	Values []float64
	// Err is set (and Values undefined) when the row did not parse.
	Err error
}

// PSVReader reads one PSV file row by row; not safe for concurrent use.
type PSVReader struct {
	sc     *bufio.Scanner
	Header *PSVHeader
	row    PSVRow
}

// NewPSVReader reads and parses the header of r.
func NewPSVReader(r io.Reader) (*PSVReader, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 8<<10), MaxPSVLine)
	if !sc.Scan() {
		if err := sc.Err(); err != nil {
			return nil, fmt.Errorf("reading psv header: %w", err)
		}
		return nil, errors.New("reading psv header: empty file")
	}
	h, err := ParsePSVHeader(sc.Bytes())
	if err != nil {
		return nil, err
	}
	return &PSVReader{sc: sc, Header: h, row: PSVRow{Values: make([]float64, len(h.Columns))}}, nil
}

// Next returns the next row (row.Err set when it did not parse), or io.EOF
// after the last one, or the underlying read error (including a line longer
// than MaxPSVLine). Blank lines are skipped but counted in row numbers.
func (p *PSVReader) Next() (*PSVRow, error) {
	for p.sc.Scan() {
		p.row.Number++
		line := p.sc.Bytes()
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		p.row.Line = line
		p.row.Err = ParsePSVLine(line, p.row.Values)
		return &p.row, nil
	}
	if err := p.sc.Err(); err != nil {
		return nil, fmt.Errorf("reading psv row %d: %w", p.row.Number+1, err)
	}
	return nil, io.EOF
}

func clip(b []byte) string {
	if len(b) > 40 {
		return string(b[:40]) + "…"
	}
	return string(b)
}
