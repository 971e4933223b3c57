package model

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vigilhealth/vigil/internal/catalog"
)

func readTestManifest(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "manifest.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseManifest(t *testing.T) {
	m, err := ParseManifest(readTestManifest(t))
	if err != nil {
		t.Fatal(err)
	}
	if m.Kind() != "model:sepsis" || m.Version != "1" || len(m.Inputs) != 4 || m.Output.Index != 1 || m.Threshold != 0.05 {
		t.Fatalf("parsed %+v", m)
	}
	if m.Inputs[0].Kind() != SourceLast || m.Inputs[0].Metric() != "heart_rate" || m.Inputs[2].Kind() != SourceStay || m.Inputs[3].Metric() != "spo2" {
		t.Fatalf("sources %+v", m.Inputs)
	}
	if m.Training.Rows != 1000 || m.Metrics["auroc"] != 0.8 {
		t.Fatalf("training/metrics %+v %v", m.Training, m.Metrics)
	}
	if err := m.CheckMetrics(catalog.Default()); err != nil {
		t.Fatal(err)
	}
	// Marshal round-trips.
	doc, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	m2, err := ParseManifest(doc)
	if err != nil {
		t.Fatalf("re-parsing marshalled manifest: %v\n%s", err, doc)
	}
	if m2.Name != m.Name || m2.Inputs[0].Reference.Proportions[1] != 0.4 || !m2.Created.Equal(m.Created) {
		t.Fatalf("round trip %+v", m2)
	}
}

func TestParseManifestErrorsNameFields(t *testing.T) {
	good := string(readTestManifest(t))
	cases := []struct{ old, new, want string }{
		{"name: sepsis", "name: Sepsis/x", "name:"},
		{"version: \"1\"", "version: \"../x\"", "version:"},
		{"sha256: 0000", "sha256: zz00", "sha256:"},
		{"algorithm: gbt", "algorithm: forest", "algorithm:"},
		{"source: stay_h", "source: stay_h:x", "inputs[2].source:"},
		{"source: count:spo2", "source: median:spo2", "inputs[3].source:"},
		{"source: last:heart_rate", "source: \"last:\"", "inputs[0].source:"},
		{"name: heart_rate_age", "name: heart_rate_last", "inputs[1].name:"},
		{"proportions: [0.1, 0.4, 0.4, 0.1]", "proportions: [0.1, 0.4, 0.5]", "inputs[0].reference:"},
		{"edges: [60, 80, 100]", "edges: [60, 100, 80]", "inputs[0].reference:"},
		{"proportions: [0.1, 0.4, 0.4, 0.1]", "proportions: [0.1, 0.4, 0.4, 0.2]", "inputs[0].reference:"},
		{"input_name: input", "input_name: \"\"", "input_name:"},
		{"index: 1", "index: -1", "output.index:"},
		{"threshold: 0.05", "threshold: 1.5", "threshold:"},
		{"unit: h\n    fill: 24", "unit: \"\"\n    fill: 24", "inputs[1].unit:"},
		{"created: 2026-11-23T20:00:00Z\n", "", "created:"},
		{"threshold: 0.05", "threshold: 0.05\nthreshhold: 0.1", "field threshhold not found"},
	}
	for _, c := range cases {
		if !strings.Contains(good, c.old) {
			t.Fatalf("test case: %q not in manifest", c.old)
		}
		_, err := ParseManifest([]byte(strings.Replace(good, c.old, c.new, 1)))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q -> %q: error %v, want one naming %q", c.old, c.new, err, c.want)
		}
	}
	if _, err := ParseManifest([]byte(good + "---\nname: x\n")); err == nil {
		t.Error("two YAML documents accepted")
	}
	m, err := ParseManifest([]byte(strings.Replace(good, "count:spo2", "count:lactate", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.CheckMetrics(catalog.Default()); err == nil || !strings.Contains(err.Error(), "inputs[3].source") {
		t.Fatalf("CheckMetrics(lactate) = %v", err)
	}
}

// mapSource is a Source over fixed values.
type mapSource struct {
	latest map[string][2]float64
	first  int64
	counts map[string]int
}

func (s *mapSource) Latest(m string) (float64, int64, bool) {
	v, ok := s.latest[m]
	return v[0], int64(v[1]), ok
}
func (s *mapSource) FirstSampleMs() int64 { return s.first }
func (s *mapSource) Count(m string) int   { return s.counts[m] }

func TestVectorSources(t *testing.T) {
	m, err := ParseManifest(readTestManifest(t))
	if err != nil {
		t.Fatal(err)
	}
	const h = 3_600_000
	at := int64(100 * h)
	src := mapSource{
		latest: map[string][2]float64{"heart_rate": {112, float64(at - 90*60_000)}},
		first:  at - 10*h,
		counts: map[string]int{"spo2": 7},
	}
	got := m.Vector(nil, &src, at)
	want := []float32{112, 1.5, 10, 7}
	if len(got) != len(want) {
		t.Fatalf("Vector = %v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("Vector = %v, want %v", got, want)
		}
	}
	vals := m.Values(nil, &src, at)
	if vals[0].TimeMs != at-90*60_000 || vals[0].Missing || vals[2].TimeMs != at {
		t.Fatalf("Values = %+v", vals)
	}
	// Nothing observed: last/age/stay filled and missing, count 0 (not missing).
	empty := mapSource{}
	vals = m.Values(vals, &empty, at)
	if !vals[0].Missing || vals[0].Value != 80 || !vals[1].Missing || vals[1].Value != 24 || !vals[2].Missing || vals[3].Missing || vals[3].Value != 0 {
		t.Fatalf("Values(empty) = %+v", vals)
	}
	// A value newer than the scoring time is not "at or before" it.
	if v := m.Eval(0, &src, at-2*h); !v.Missing || v.Value != 80 {
		t.Fatalf("Eval before the observation = %+v", v)
	}
	// Reusing dst does not allocate.
	buf := make([]float32, 0, 4)
	if n := testing.AllocsPerRun(100, func() { buf = m.Vector(buf, &src, at) }); n != 0 {
		t.Fatalf("Vector allocates %v times", n)
	}
}

func TestSave(t *testing.T) {
	dir := t.TempDir()
	m, err := ParseManifest(readTestManifest(t))
	if err != nil {
		t.Fatal(err)
	}
	onnx := []byte("not really onnx")
	vdir, err := Save(dir, m, onnx)
	if err != nil {
		t.Fatal(err)
	}
	if vdir != filepath.Join(dir, "sepsis", "1") || m.SHA256 != SHA256Hex(onnx) {
		t.Fatalf("Save -> %s, sha %s", vdir, m.SHA256)
	}
	doc, err := os.ReadFile(filepath.Join(vdir, ManifestFile))
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParseManifest(doc)
	if err != nil || back.SHA256 != SHA256Hex(onnx) {
		t.Fatalf("saved manifest: %v %+v", err, back)
	}
	if _, err := Save(dir, m, []byte("other bytes")); err == nil || !strings.Contains(err.Error(), "immutable") {
		t.Fatalf("overwriting a version with other bytes: %v", err)
	}
}

// FuzzParseManifest: any bytes either fail with an error or give a manifest
// that validates and round-trips through Marshal.
func FuzzParseManifest(f *testing.F) {
	f.Add(readTestManifest(f))
	f.Add([]byte("name: x\n"))
	f.Add([]byte("inputs: [{name: a, source: 'count:'}]"))
	f.Fuzz(func(t *testing.T, doc []byte) {
		m, err := ParseManifest(doc)
		if err != nil {
			return
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("parsed manifest does not validate: %v", err)
		}
		out, err := m.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseManifest(out); err != nil {
			t.Fatalf("marshalled manifest does not parse: %v\n%s", err, out)
		}
		buf := m.Vector(nil, &mapSource{}, 1)
		if len(buf) != len(m.Inputs) {
			t.Fatalf("Vector len %d", len(buf))
		}
	})
}
