// Package sepsis2019 validates Vigil's detectors on the PhysioNet/Computing
// in Cardiology Challenge 2019 data ("Early Prediction of Sepsis from
// Clinical Data", training set B): it reads the patients' hourly rows
// (a folder of .psv files or the training_setB.tar.gz archive, streamed),
// replays them through the real pipeline (embedded Kafka-protocol broker,
// ingest validation and publishing, the stream engine with its detectors;
// see Run), and scores the detectors with the challenge's own measures:
// the hourly AUROC and the normalised utility of the official
// evaluate_sepsis_score.py (see Utility).
//
// Split divides the patients 70/30 with a fixed seed; the model trained on
// the 70 % (Train) is compared with NEWS2 on the 30 %.
package sepsis2019

import (
	"archive/tar"
	"bytes"
	"cmp"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/ingest/replay"
)

// Admission returns the event time of ICU admission (ICULOS 0) of every
// patient, 2019-01-01T00:00:00Z: fixed, so that two validation runs are
// identical (the challenge data carry no dates). A row's event time is
// Admission() + ICULOS hours.
func Admission() time.Time { return time.Date(2019, 1, 1, 0, 0, 0, 0, time.UTC) }

// Column maps a PSV column onto a catalogue metric.
type Column struct {
	// Name is the PSV header name, e.g. "HR".
	Name string
	// Metric is the catalogue id, e.g. "heart_rate".
	Metric string
	// Unit is the UCUM unit of the column's values; ingest validation
	// converts it to the metric's canonical unit (FiO2 is a fraction in
	// the data: "1" → %).
	Unit string
}

// Columns are the challenge columns that have a catalogue metric, in the
// order of Row.Values: the eight vital signs of the challenge except EtCO2
// (no catalogue metric), and the laboratory glucose (mg/dL in the data,
// the catalogue's unit). The other laboratory values, the demographics and
// the unit/admission columns have no metric and are not sent.
var columns = [...]Column{
	{"HR", "heart_rate", "/min"},
	{"O2Sat", "spo2", "%"},
	{"Temp", "body_temperature", "Cel"},
	{"SBP", "systolic_bp", "mm[Hg]"},
	{"MAP", "mean_arterial_pressure", "mm[Hg]"},
	{"DBP", "diastolic_bp", "mm[Hg]"},
	{"Resp", "respiratory_rate", "/min"},
	{"FiO2", "fio2", "1"},
	{"Glucose", "glucose", "mg/dL"},
}

// NumColumns is the number of mapped columns (len(Row.Values)).
const NumColumns = len(columns)

// Columns returns the mapped columns in Row.Values order (a copy).
func Columns() []Column { return slices.Clone(columns[:]) }

// Patient is one ICU stay: one PSV file.
type Patient struct {
	// ID is the file name without .psv, e.g. "p100001".
	ID   string
	Rows []Row
}

// Septic reports whether any row is labelled 1.
func (p *Patient) Septic() bool {
	return slices.ContainsFunc(p.Rows, func(r Row) bool { return r.Label })
}

// Row is one ICU hour.
type Row struct {
	// ICULOS is the hours since ICU admission (the file's ICULOS column).
	ICULOS int
	// Label is SepsisLabel: already shifted 6 h before the onset of sepsis
	// in the data.
	Label bool
	// Values holds the mapped columns (Columns order) in the file's units;
	// NaN where the file has NaN (not measured that hour).
	Values [NumColumns]float64
}

// TimeMs is the row's event time: Admission() + ICULOS hours, Unix ms.
func (r *Row) TimeMs() int64 {
	return Admission().UnixMilli() + int64(r.ICULOS)*int64(time.Hour/time.Millisecond)
}

// Limits of what ParsePatient accepts.
const (
	// MaxRows bounds the rows of one file (the longest stay of the
	// challenge has 336).
	MaxRows = 100_000
	// MaxICULOS bounds ICULOS (hours): about 11 years.
	MaxICULOS = 100_000
)

// ParsePatient parses one PSV file named name (its base name without .psv
// is the patient id). The header must name ICULOS and SepsisLabel;
// SepsisLabel must be 0 or 1 and ICULOS a whole number of hours, at least
// 0 and rising from row to row. Errors name the file and the line (1 is
// the header).
func ParsePatient(name string, r io.Reader) (*Patient, error) {
	id := strings.TrimSuffix(path.Base(filepath.ToSlash(name)), ".psv")
	if id == "" {
		return nil, fmt.Errorf("%s: no patient id in the file name", name)
	}
	pr, err := replay.NewPSVReader(r)
	if err != nil {
		return nil, fmt.Errorf("%s line 1: %w", name, err)
	}
	h := pr.Header
	label := slices.Index(h.Columns, "SepsisLabel")
	if label < 0 {
		return nil, fmt.Errorf("%s line 1: no SepsisLabel column", name)
	}
	var idx [NumColumns]int
	for i, c := range columns {
		idx[i] = slices.Index(h.Columns, c.Name)
	}
	p := &Patient{ID: id}
	prev := -1
	for {
		row, err := pr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		line := row.Number + 1
		if row.Err != nil {
			return nil, fmt.Errorf("%s line %d: %w", name, line, row.Err)
		}
		if len(p.Rows) == MaxRows {
			return nil, fmt.Errorf("%s line %d: more than %d rows", name, line, MaxRows)
		}
		hours := row.Values[h.ICULOS]
		if math.IsNaN(hours) || hours != math.Trunc(hours) || hours < 0 || hours > MaxICULOS {
			return nil, fmt.Errorf("%s line %d: ICULOS %v is not a whole number of hours in [0, %d]", name, line, hours, MaxICULOS)
		}
		if int(hours) <= prev {
			return nil, fmt.Errorf("%s line %d: ICULOS %v does not rise (previous row: %d)", name, line, hours, prev)
		}
		prev = int(hours)
		l := row.Values[label]
		if l != 0 && l != 1 {
			return nil, fmt.Errorf("%s line %d: SepsisLabel %v is not 0 or 1", name, line, l)
		}
		out := Row{ICULOS: int(hours), Label: l == 1}
		for i, j := range idx {
			out.Values[i] = math.NaN()
			if j >= 0 {
				out.Values[i] = row.Values[j]
			}
		}
		p.Rows = append(p.Rows, out)
	}
	return p, nil
}

// Read reads the patients of src: a folder of .psv files (other files are
// ignored), a .tar.gz/.tgz archive of them (streamed: read once, never
// unpacked), or one .psv file. The patients come sorted by id (byte-wise
// order of the file names: p100001 < p100002 < ...); limit > 0 keeps the
// first limit of them (from an archive every entry is still read, but only
// limit patients are held). The first malformed file fails the read with
// an error naming it and its line. It blocks until done or ctx ends.
func Read(ctx context.Context, src string, limit int) ([]*Patient, error) {
	fi, err := os.Stat(src)
	if err != nil {
		return nil, fmt.Errorf("reading sepsis data: %w", err)
	}
	switch {
	case fi.IsDir():
		return readDir(ctx, src, limit)
	case strings.HasSuffix(src, ".tar.gz") || strings.HasSuffix(src, ".tgz"):
		return readTarGz(ctx, src, limit)
	case strings.HasSuffix(src, ".psv"):
		f, err := os.Open(src)
		if err != nil {
			return nil, fmt.Errorf("reading sepsis data: %w", err)
		}
		defer f.Close()
		p, err := ParsePatient(src, f)
		if err != nil {
			return nil, err
		}
		return []*Patient{p}, nil
	}
	return nil, fmt.Errorf("reading sepsis data: %s is neither a folder, a .tar.gz archive nor a .psv file", src)
}

func readDir(ctx context.Context, dir string, limit int) ([]*Patient, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading sepsis data: %w", err)
	}
	var names []string
	for _, e := range ents {
		if !e.IsDir() && strings.HasSuffix(e.Name(), ".psv") {
			names = append(names, e.Name())
		}
	}
	slices.Sort(names)
	if limit > 0 && len(names) > limit {
		names = names[:limit]
	}
	out := make([]*Patient, 0, len(names))
	for _, n := range names {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		p, err := readFile(filepath.Join(dir, n))
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("reading sepsis data: no .psv files in %s", dir)
	}
	return out, nil
}

func readFile(name string) (*Patient, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("reading sepsis data: %w", err)
	}
	defer f.Close()
	return ParsePatient(name, f)
}

func readTarGz(ctx context.Context, name string, limit int) ([]*Patient, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("reading sepsis data: %w", err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", name, err)
	}
	defer gz.Close()
	tr := tar.NewReader(gz)
	var out []*Patient // sorted by id; at most limit when limit > 0
	idCmp := func(a *Patient, id string) int { return cmp.Compare(a.ID, id) }
	var buf bytes.Buffer
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", name, err)
		}
		if h.Typeflag != tar.TypeReg || !strings.HasSuffix(h.Name, ".psv") {
			continue
		}
		id := strings.TrimSuffix(path.Base(h.Name), ".psv")
		if limit > 0 && len(out) == limit && id >= out[len(out)-1].ID {
			continue // would be dropped at once: not even parsed
		}
		buf.Reset()
		if _, err := io.Copy(&buf, io.LimitReader(tr, 64<<20)); err != nil {
			return nil, fmt.Errorf("reading %s:%s: %w", name, h.Name, err)
		}
		p, err := ParsePatient(name+":"+h.Name, &buf)
		if err != nil {
			return nil, err
		}
		i, dup := slices.BinarySearchFunc(out, p.ID, idCmp)
		if dup {
			return nil, fmt.Errorf("reading %s: patient %s appears twice", name, p.ID)
		}
		out = slices.Insert(out, i, p)
		if limit > 0 && len(out) > limit {
			out = out[:limit]
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("reading sepsis data: no .psv entries in %s", name)
	}
	return out, nil
}

// CountRows is the number of rows of ps.
func CountRows(ps []*Patient) int {
	n := 0
	for _, p := range ps {
		n += len(p.Rows)
	}
	return n
}
