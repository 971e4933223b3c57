package replay

import (
	"archive/tar"
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/gzip"

	"github.com/vigilhealth/vigil/ingest/validate"
)

// Content types written on dead letters.
const (
	contentTypePSV       = "text/x-psv"
	contentTypeRecording = "application/json"
	contentTypeWFDB      = "application/x-wfdb"
)

// counting counts the bytes read through it into n.
type counting struct {
	r io.Reader
	n *atomic.Int64
}

func (c counting) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func isTarball(name string) bool {
	return strings.HasSuffix(name, ".tar.gz") || strings.HasSuffix(name, ".tgz") || strings.HasSuffix(name, ".tar")
}

// inputSize is the bytes of the files a path stands for (for the progress
// bar); 0 when unknown.
func inputSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return 0
	}
	if !fi.IsDir() {
		return fi.Size()
	}
	var n int64
	_ = filepath.WalkDir(p, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if i, err := d.Info(); err == nil {
				n += i.Size()
			}
		}
		return nil
	})
	return n
}

// errEnough stops reading inputs once Options.MaxFiles files were read.
var errEnough = errors.New("replay: max files reached")

// enough reports whether Options.MaxFiles files were read.
func (rn *run) enough() bool {
	return rn.opts.MaxFiles > 0 && rn.st.files.Load() >= rn.opts.MaxFiles
}

// input replays one command-line input: a folder (its files in lexical
// order, recursively), a tarball (its entries in archive order), or a file.
// It returns errEnough when Options.MaxFiles is reached.
func (rn *run) input(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return fmt.Errorf("opening input: %w", err)
	}
	if !fi.IsDir() {
		return rn.file(p)
	}
	return filepath.WalkDir(p, func(fp string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("reading input folder: %w", err)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		return rn.file(fp)
	})
}

// file replays one file on disk. WFDB signal files (.dat) and annotations
// are read through their header (.hea), so they are not inputs themselves.
func (rn *run) file(p string) error {
	if rn.enough() {
		return errEnough
	}
	name := filepath.Base(p)
	switch {
	case strings.HasSuffix(name, ".dat") || strings.HasSuffix(name, ".atr") || strings.HasSuffix(name, ".xws"):
		return nil
	case strings.HasSuffix(name, ".hea"):
		return rn.wfdb(p)
	}
	f, err := os.Open(p)
	if err != nil {
		return fmt.Errorf("opening input: %w", err)
	}
	defer f.Close()
	r := counting{r: f, n: &rn.st.bytes}
	if isTarball(name) {
		return rn.tarball(p, r)
	}
	return rn.stream(p, name, r)
}

// tarball replays the entries of a (gzip-compressed) tar stream in order,
// without writing them anywhere.
func (rn *run) tarball(p string, r io.Reader) error {
	if !strings.HasSuffix(p, ".tar") {
		br := bufio.NewReaderSize(r, 256<<10)
		gz, err := gzip.NewReader(br)
		if err != nil {
			return fmt.Errorf("reading %s: %w", p, err)
		}
		defer gz.Close()
		r = gz
	}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading %s: %w", p, err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		if rn.enough() {
			return errEnough
		}
		if strings.HasSuffix(h.Name, ".hea") {
			// A record's signal file is another entry; WFDB records
			// replay from folders only.
			rn.st.skipped.Add(1)
			rn.log.Warn("replay: WFDB record inside a tarball skipped; unpack it and replay the folder", "entry", h.Name)
			continue
		}
		if err := rn.stream(p+":"+h.Name, path.Base(h.Name), tr); err != nil {
			return err
		}
	}
}

// stream replays one file's content by its name's format.
func (rn *run) stream(origin, name string, r io.Reader) error {
	switch {
	case strings.HasSuffix(name, ".psv"):
		return rn.psv(origin, strings.TrimSuffix(name, ".psv"), r)
	case IsRecording(name):
		if strings.HasSuffix(name, ".gz") {
			gz, err := gzip.NewReader(r)
			if err != nil {
				return fmt.Errorf("reading %s: %w", origin, err)
			}
			defer gz.Close()
			r = gz
		}
		return rn.recording(origin, strings.TrimSuffix(strings.TrimSuffix(name, ".gz"), path.Ext(strings.TrimSuffix(name, ".gz"))), r)
	}
	rn.st.skipped.Add(1)
	rn.log.Debug("replay: skipping a file of unknown format", "file", origin)
	return nil
}

// psv replays one PSV file (patient stem). A file whose header does not
// parse is one dead letter; a row that does not parse is one dead letter;
// reading errors fail the run.
func (rn *run) psv(origin, stem string, r io.Reader) error {
	rn.st.files.Add(1)
	tenant := rn.opts.Tenant
	pr, err := NewPSVReader(r)
	if err != nil {
		// The file as a whole is refused (one dead letter, no raw bytes:
		// the header is what failed); the run goes on with the next file.
		return rn.emit(&unit{origin: origin, contentType: contentTypePSV, tenant: tenant, patient: stem, device: "psv",
			msgID: "replay-" + stem + "-0", refusal: validate.Refuse(validate.MalformedMessage, "", "%v", err)})
	}
	h := pr.Header
	startMs := rn.opts.Start.UnixMilli()
	u := &unit{contentType: contentTypePSV}
	for {
		row, err := pr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading %s: %w", origin, err)
		}
		num := strconv.Itoa(row.Number)
		*u = unit{origin: origin + ":" + num, contentType: contentTypePSV, raw: row.Line, msgID: "replay-" + stem + "-" + num,
			items: u.items[:0], tenant: tenant, patient: stem, device: "psv"}
		if row.Err != nil {
			u.refusal = validate.Refuse(validate.MalformedMessage, "", "row %d: %v", row.Number, row.Err)
			if err := rn.emit(u); err != nil {
				return err
			}
			continue
		}
		hours := row.Values[h.ICULOS]
		if math.IsNaN(hours) || hours < 1 || hours != math.Trunc(hours) || hours > 1e6 {
			u.refusal = validate.Refuse(validate.InvalidTime, "ICULOS", "row %d: ICULOS %v is not a whole number of hours ≥ 1", row.Number, hours)
			if err := rn.emit(u); err != nil {
				return err
			}
			continue
		}
		ev := startMs + (int64(hours)-1)*int64(time.Hour/time.Millisecond)
		u.eventMs = ev
		var labs, unmapped int64
		for i, v := range row.Values {
			if math.IsNaN(v) {
				continue
			}
			switch h.kinds[i] {
			case psvLab:
				labs++
			case psvUnmapped:
				unmapped++
			}
		}
		rn.st.labs.Add(labs)
		rn.st.unmapped.Add(unmapped)
		for _, c := range h.Vitals {
			v := row.Values[c.Index]
			if math.IsNaN(v) {
				continue
			}
			u.items = append(u.items, item{msgID: u.msgID, field: c.Column, in: validate.Input{
				Tenant: tenant, Patient: stem, Device: "psv", Metric: c.Metric, Value: v, HasValue: true, Unit: c.Unit,
				EventTimeMs: ev, HasTime: true, Sequence: uint64(row.Number), SourceCode: "PSV:" + c.Column,
			}})
		}
		if len(u.items) == 0 {
			// An hour without vitals (labs only, or nothing): nothing
			// to send.
			continue
		}
		if err := rn.emit(u); err != nil {
			return err
		}
	}
}

// recording replays a recording line by line.
func (rn *run) recording(origin, stem string, r io.Reader) error {
	rn.st.files.Add(1)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), MaxRecordingLine)
	n := 0
	u := &unit{contentType: contentTypeRecording}
	for sc.Scan() {
		n++
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		num := strconv.Itoa(n)
		*u = unit{origin: origin + ":" + num, contentType: contentTypeRecording, raw: line,
			msgID: "replay-" + stem + "-" + num, items: u.items[:0]}
		var rf *validate.Refusal
		u.items, rf = decodeBody(line, u.msgID, u.items)
		if rf != nil {
			u.refusal = rf
			u.items = u.items[:0]
		}
		for i := range u.items {
			if t := u.items[i].in.EventTimeMs; t > u.eventMs && u.items[i].in.HasTime {
				u.eventMs = t
			}
		}
		if err := rn.emit(u); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("reading %s line %d: %w", origin, n+1, err)
	}
	return nil
}
