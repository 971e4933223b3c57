package sepsis2019

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/vigilhealth/vigil/internal/testenv"
)

// tarball is the shared data set's archive.
func tarball(t testing.TB) string {
	t.Helper()
	return filepath.Join(testenv.Dataset(t, "sepsis2019-setB"), "training_setB.tar.gz")
}

// rawFiles returns the first n .psv entries of the archive (archive order)
// as name → bytes.
func rawFiles(t testing.TB, n int) map[string][]byte {
	t.Helper()
	f, err := os.Open(tarball(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(gz)
	out := map[string][]byte{}
	for len(out) < n {
		h, err := tr.Next()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasSuffix(h.Name, ".psv") {
			continue
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(h.Name)] = b
	}
	return out
}

// A folder of files and the archive read the same patients: the first N
// by id, whatever the archive's order.
func TestReadFolderEqualsArchive(t *testing.T) {
	ctx := context.Background()
	fromTar, err := Read(ctx, tarball(t), 25)
	if err != nil {
		t.Fatal(err)
	}
	if len(fromTar) != 25 || !slices.IsSortedFunc(fromTar, byID) {
		t.Fatalf("archive gave %d patients, sorted %v", len(fromTar), slices.IsSortedFunc(fromTar, byID))
	}
	// The challenge's set B numbers its patients p100001...
	if fromTar[0].ID != "p100001" || fromTar[24].ID != "p100025" {
		t.Fatalf("first patients %s..%s, want p100001..p100025", fromTar[0].ID, fromTar[24].ID)
	}
	// Write the 25 plus a few later ones (from the archive's first
	// entries) to a folder: the folder read with limit 25 is the same.
	dir := t.TempDir()
	for name, b := range rawFiles(t, 5) {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range fromTar {
		var b bytes.Buffer
		writePSV(&b, p)
		if err := os.WriteFile(filepath.Join(dir, p.ID+".psv"), b.Bytes(), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "README"), []byte("not a psv"), 0o600); err != nil {
		t.Fatal(err)
	}
	fromDir, err := Read(ctx, dir, 25)
	if err != nil {
		t.Fatal(err)
	}
	if !samePatients(fromTar, fromDir) {
		t.Fatal("the folder and the archive read different patients")
	}
	// The first row of p100001 as the file has it.
	r := fromTar[0].Rows[0]
	if r.ICULOS < 1 || !math.IsNaN(r.Values[0]) && r.Values[0] <= 0 {
		t.Errorf("p100001 row 1: %+v", r)
	}
}

func samePatients(a, b []*Patient) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].ID != b[i].ID || len(a[i].Rows) != len(b[i].Rows) {
			return false
		}
		for j := range a[i].Rows {
			x, y := a[i].Rows[j], b[i].Rows[j]
			if x.ICULOS != y.ICULOS || x.Label != y.Label {
				return false
			}
			for k := range x.Values {
				if x.Values[k] != y.Values[k] && !(math.IsNaN(x.Values[k]) && math.IsNaN(y.Values[k])) {
					return false
				}
			}
		}
	}
	return true
}

// writePSV writes p back as a PSV file of its mapped columns, ICULOS and
// SepsisLabel.
func writePSV(w io.Writer, p *Patient) {
	var names []string
	for _, c := range columns {
		names = append(names, c.Name)
	}
	io.WriteString(w, strings.Join(append(names, "ICULOS", "SepsisLabel"), "|")+"\n")
	for _, r := range p.Rows {
		var cells []string
		for _, v := range r.Values {
			if math.IsNaN(v) {
				cells = append(cells, "NaN")
			} else {
				cells = append(cells, strconv.FormatFloat(v, 'g', -1, 64))
			}
		}
		l := "0"
		if r.Label {
			l = "1"
		}
		io.WriteString(w, strings.Join(append(cells, strconv.Itoa(r.ICULOS), l), "|")+"\n")
	}
}

// Malformed files fail with the file and the line named.
func TestParsePatientErrors(t *testing.T) {
	const header = "HR|O2Sat|ICULOS|SepsisLabel\n"
	cases := []struct{ name, doc, want string }{
		{"bad cell", header + "80|97|1|0\n81|x7|2|0\n", `p1.psv line 3: cell 2: "x7" is not a finite decimal number`},
		{"short row", header + "80|97|1\n", "p1.psv line 2: 3 cells, want 4"},
		{"label", header + "80|97|1|2\n", "p1.psv line 2: SepsisLabel 2 is not 0 or 1"},
		{"iculos", header + "80|97|1.5|0\n", "p1.psv line 2: ICULOS 1.5 is not a whole number"},
		{"falling", header + "80|97|2|0\n80|97|2|0\n", "p1.psv line 3: ICULOS 2 does not rise"},
		{"no label", "HR|ICULOS\n80|1\n", "p1.psv line 1: no SepsisLabel column"},
		{"no iculos", "HR|SepsisLabel\n80|1\n", "p1.psv line 1: parsing psv header: no ICULOS column"},
		{"empty", "", "p1.psv line 1: reading psv header: empty file"},
	}
	for _, c := range cases {
		_, err := ParsePatient("p1.psv", strings.NewReader(c.doc))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want it to contain %q", c.name, err, c.want)
		}
	}
	// In a folder, the file's path is named.
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p000001.psv"), []byte(header+"80|97|1|0\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "p000002.psv"), []byte(header+"80|97|1|0\n80|97|2|0\n80|NaN|3|x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Read(context.Background(), dir, 0)
	if want := filepath.Join(dir, "p000002.psv") + " line 4: cell 4"; err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("folder error %v, want it to contain %q", err, want)
	}
	if _, err := Read(context.Background(), filepath.Join(dir, "missing.tar.gz"), 0); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing archive: %v", err)
	}
}

// FuzzParsePatient feeds arbitrary bytes to the PSV parser: it never
// panics, and what it accepts keeps its invariants (ICULOS rising, values
// NaN or finite) and reads back the same after writing it out again.
func FuzzParsePatient(f *testing.F) {
	// The header and first rows of a few challenge files (whole files
	// make every new input slow to minimise).
	for _, b := range rawFiles(f, 3) {
		lines := bytes.SplitAfter(b, []byte("\n"))
		f.Add(bytes.Join(lines[:min(len(lines), 4)], nil))
	}
	f.Add([]byte("HR|O2Sat|FiO2|ICULOS|SepsisLabel\n80|97|0.5|1|0\r\n|NaN|nan|2|1\n\n81|96|0.4|4|1\n"))
	f.Add([]byte("ICULOS|SepsisLabel|ICULOS\n1|0|1\n"))
	f.Fuzz(func(t *testing.T, doc []byte) {
		p, err := ParsePatient("p1.psv", bytes.NewReader(doc))
		if err != nil {
			if !strings.HasPrefix(err.Error(), "p1.psv") {
				t.Fatalf("error %q does not name the file", err)
			}
			return
		}
		prev := -1
		for _, r := range p.Rows {
			if r.ICULOS <= prev || r.ICULOS > MaxICULOS {
				t.Fatalf("ICULOS %d after %d accepted", r.ICULOS, prev)
			}
			prev = r.ICULOS
			for _, v := range r.Values {
				if math.IsInf(v, 0) {
					t.Fatalf("infinite value accepted: %+v", r)
				}
			}
		}
		var b bytes.Buffer
		writePSV(&b, p)
		q, err := ParsePatient("p1.psv", &b)
		if err != nil {
			t.Fatalf("rewritten file does not parse: %v\n%s", err, b.String())
		}
		if !samePatients([]*Patient{p}, []*Patient{q}) {
			t.Fatalf("rewritten file reads differently:\n%s", b.String())
		}
	})
}
