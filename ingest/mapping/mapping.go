// Package mapping holds the tables that turn a source's codes into Vigil's
// vocabulary: IEEE 11073-10101 (MDC) and LOINC observation codes into
// catalogue metric ids, and MDC or UCUM unit codes (and the aliases real
// feeds send, such as "bpm" or "mmHg") into UCUM units. The catalogue
// (internal/catalog) then converts each UCUM unit to the metric's canonical
// one.
//
// The tables are data, not code: defaults are embedded (defaults.yaml, with
// the source each code was verified against), and a hospital extends or
// overrides them with YAML files of the same format in a folder
// (ingest.mapping_dir), read at start and re-read on change by a Store (hot
// reload); a restart picks them up as well. Entries of later files override
// earlier ones for the same (system, code): the embedded defaults first, then
// the folder's *.yaml / *.yml files in lexical order.
//
// A Tables value is an immutable snapshot and safe for concurrent use; a
// Store swaps snapshots atomically, so a lookup never sees half a reload.
package mapping

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"gopkg.in/yaml.v3"

	"github.com/vigilhealth/vigil/internal/catalog"
)

//go:embed defaults.yaml
var defaultYAML []byte

// DefaultsName is the name under which errors and Files report the embedded
// defaults.
const DefaultsName = "(embedded) defaults.yaml"

// Bounds on what a mapping folder may hold (its files are outside bytes).
const (
	// MaxFileBytes bounds one mapping file.
	MaxFileBytes = 1 << 20
	// MaxFiles bounds the mapping files read from a folder.
	MaxFiles = 256
	// MaxCodeLen bounds a code, reference id or unit, in bytes.
	MaxCodeLen = 128
)

// Canonical system names, as Tables reports them and as metrics label them.
const (
	SystemMDC   = "MDC"
	SystemLOINC = "LOINC"
	SystemUCUM  = "UCUM"
)

// systemAliases maps lower-cased system names (HL7 v2 coding-system ids,
// FHIR system URIs, OIDs) onto the canonical ones.
var systemAliases = map[string]string{
	"mdc":                            SystemMDC,
	"mdc_ieee":                       SystemMDC,
	"ieee11073":                      SystemMDC,
	"iso11073":                       SystemMDC,
	"urn:iso:std:iso:11073:10101":    SystemMDC,
	"urn:oid:2.16.840.1.113883.6.24": SystemMDC, // HL7 OID of the MDC nomenclature
	"2.16.840.1.113883.6.24":         SystemMDC,
	"ln":                             SystemLOINC,
	"loinc":                          SystemLOINC,
	"http://loinc.org":               SystemLOINC,
	"https://loinc.org":              SystemLOINC,
	"urn:oid:2.16.840.1.113883.6.1":  SystemLOINC,
	"2.16.840.1.113883.6.1":          SystemLOINC,
	"ucum":                           SystemUCUM,
	"http://unitsofmeasure.org":      SystemUCUM,
	"https://unitsofmeasure.org":     SystemUCUM,
	"urn:oid:2.16.840.1.113883.6.8":  SystemUCUM,
	"2.16.840.1.113883.6.8":          SystemUCUM,
}

// CanonicalSystem returns "MDC", "LOINC" or "UCUM" for a system name or one
// of its aliases (case-insensitive, surrounding spaces ignored), and false
// for any other system.
func CanonicalSystem(system string) (string, bool) {
	switch system {
	case SystemMDC, SystemLOINC, SystemUCUM:
		return system, true // the common case, without lower-casing
	}
	s, ok := systemAliases[strings.ToLower(strings.TrimSpace(system))]
	return s, ok
}

// Tables is one immutable snapshot of the mapping tables. It is safe for
// concurrent use; lookups do not allocate for codes given in canonical form.
type Tables struct {
	mdcMetric   map[uint32]string // MDC 32-bit code → metric id
	mdcRefIDs   map[string]uint32 // MDC reference id → 32-bit code
	loincMetric map[string]string // LOINC → metric id (table entries and catalogue)
	mdcUnit     map[uint32]string // MDC unit code → UCUM
	ucumUnit    map[string]string // UCUM code or alias → UCUM
	ucumFold    map[string]string // lower-cased alias → UCUM
	files       []string
	metricRows  int
	unitRows    int
}

// Metric maps an observation code onto a catalogue metric id. system "MDC"
// (or an alias such as "urn:iso:std:iso:11073:10101") takes the numeric
// 32-bit code as HL7 PCD-01 sends it ("150456" = partition 2 × 65536 + term
// 19384), the "partition::term" form ("2::19384") or the reference id
// ("MDC_PULS_OXIM_SAT_O2"); system "LOINC" (or "LN", "http://loinc.org")
// takes a LOINC code, mapped by the table or else by the catalogue. An empty
// system tries MDC, then LOINC. ok is false when the code has no entry.
func (t *Tables) Metric(system, code string) (metricID string, ok bool) {
	code = strings.TrimSpace(code)
	if code == "" {
		return "", false
	}
	sys, known := CanonicalSystem(system)
	if !known {
		if strings.TrimSpace(system) != "" {
			return "", false
		}
		if id, ok := t.Metric(SystemMDC, code); ok {
			return id, true
		}
		return t.Metric(SystemLOINC, code)
	}
	switch sys {
	case SystemMDC:
		c, ok := t.mdcCode(code)
		if !ok {
			return "", false
		}
		id, ok := t.mdcMetric[c]
		return id, ok
	case SystemLOINC:
		id, ok := t.loincMetric[code]
		return id, ok
	}
	return "", false
}

// Unit maps a unit code onto a UCUM unit. system "MDC" takes the numeric
// 32-bit code ("262688") or the reference id ("MDC_DIM_PERCENT"); system
// "UCUM" (or "http://unitsofmeasure.org") and an empty system take a UCUM
// code or one of the aliases feeds send ("bpm" → "/min", "mmHg" → "mm[Hg]",
// "degF" → "[degF]"), matched exactly first and then case-insensitively. ok
// is false when the code has no entry; an empty code is not a unit.
func (t *Tables) Unit(system, code string) (ucum string, ok bool) {
	code = strings.TrimSpace(code)
	if code == "" {
		return "", false
	}
	sys, known := CanonicalSystem(system)
	if !known {
		if strings.TrimSpace(system) != "" {
			return "", false
		}
		sys = SystemUCUM
		if isDigits(code) || strings.HasPrefix(code, "MDC_") {
			sys = SystemMDC
		}
	}
	switch sys {
	case SystemMDC:
		c, ok := t.mdcCode(code)
		if !ok {
			return "", false
		}
		u, ok := t.mdcUnit[c]
		return u, ok
	case SystemUCUM:
		if u, ok := t.ucumUnit[code]; ok {
			return u, true
		}
		u, ok := t.ucumFold[strings.ToLower(code)]
		return u, ok
	}
	return "", false
}

// MDCCode returns the 32-bit code of an MDC code in any accepted form
// (number, "partition::term", reference id known to the tables).
func (t *Tables) MDCCode(code string) (uint32, bool) { return t.mdcCode(strings.TrimSpace(code)) }

// MDCRefID returns the reference id the tables know for a 32-bit MDC code
// (e.g. 150456 → "MDC_PULS_OXIM_SAT_O2"), for messages and logs.
func (t *Tables) MDCRefID(code uint32) (string, bool) {
	for ref, c := range t.mdcRefIDs {
		if c == code {
			return ref, true
		}
	}
	return "", false
}

// Files names the files the snapshot was built from, defaults first.
func (t *Tables) Files() []string { return append([]string(nil), t.files...) }

// Len returns the number of metric and unit entries (after overrides).
func (t *Tables) Len() (metrics, units int) {
	return len(t.mdcMetric) + len(t.loincMetric), len(t.mdcUnit) + len(t.ucumUnit)
}

func (t *Tables) mdcCode(code string) (uint32, bool) {
	if isDigits(code) {
		n, err := strconv.ParseUint(code, 10, 32)
		return uint32(n), err == nil
	}
	if p, term, ok := strings.Cut(code, "::"); ok && isDigits(p) && isDigits(term) {
		pn, err1 := strconv.ParseUint(p, 10, 16)
		tn, err2 := strconv.ParseUint(term, 10, 16)
		return uint32(pn)<<16 | uint32(tn), err1 == nil && err2 == nil
	}
	if c, ok := t.mdcRefIDs[code]; ok {
		return c, true
	}
	if len(code) <= MaxCodeLen {
		c, ok := t.mdcRefIDs[strings.ToUpper(code)]
		return c, ok
	}
	return 0, false
}

func isDigits(s string) bool {
	if s == "" || len(s) > 10 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// file is the YAML format of a mapping file (and of the embedded defaults).
type file struct {
	Version int        `yaml:"version"`
	Metrics []metricIn `yaml:"metrics"`
	Units   []unitIn   `yaml:"units"`
}

// metricIn maps one code onto a metric. For MDC, code is the 32-bit code
// and ref the reference id; one of them is required (both when known).
type metricIn struct {
	System string `yaml:"system"`
	Code   string `yaml:"code"`
	Ref    string `yaml:"ref"`
	Metric string `yaml:"metric"`
	// Note is free text (e.g. where the code was verified).
	Note string `yaml:"note"`
}

// unitIn maps one unit code (MDC or UCUM/alias) onto a UCUM unit.
type unitIn struct {
	System string `yaml:"system"`
	Code   string `yaml:"code"`
	Ref    string `yaml:"ref"`
	UCUM   string `yaml:"ucum"`
	Note   string `yaml:"note"`
}

// Default returns the embedded tables, checked against the embedded metric
// catalogue.
func Default() *Tables {
	t, err := build(catalog.Default(), []source{{DefaultsName, defaultYAML}})
	if err != nil {
		// The embedded file is tested; failing here is a build defect.
		panic(fmt.Sprintf("embedded mapping tables are invalid: %v", err))
	}
	return t
}

// Load returns the embedded tables overlaid with the mapping files (*.yaml,
// *.yml; others and hidden files are ignored) of dir, checked against the
// embedded metric catalogue. An empty dir gives the defaults. Errors name
// the file and line.
func Load(dir string) (*Tables, error) { return LoadCatalog(dir, catalog.Default()) }

// LoadCatalog is Load checking metric ids against cat (a hospital's own
// catalogue, ingest.catalog) instead of the embedded one.
func LoadCatalog(dir string, cat *catalog.Catalog) (*Tables, error) {
	srcs, err := readDir(dir)
	if err != nil {
		return nil, err
	}
	return build(cat, append([]source{{DefaultsName, defaultYAML}}, srcs...))
}

// Parse builds tables from the defaults overlaid with one document (named
// name in errors), checked against cat. It is what Load does per file, for
// tools and fuzzing.
func Parse(name string, doc []byte, cat *catalog.Catalog) (*Tables, error) {
	return build(cat, []source{{DefaultsName, defaultYAML}, {name, doc}})
}

type source struct {
	name string
	doc  []byte
}

// readDir reads the mapping files of dir in lexical order.
func readDir(dir string) ([]source, error) {
	if dir == "" {
		return nil, nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("reading mapping folder: %w", err)
	}
	var names []string
	for _, e := range entries {
		n := e.Name()
		if e.IsDir() || strings.HasPrefix(n, ".") {
			continue
		}
		if ext := strings.ToLower(filepath.Ext(n)); ext != ".yaml" && ext != ".yml" {
			continue
		}
		names = append(names, n)
	}
	sort.Strings(names)
	if len(names) > MaxFiles {
		return nil, fmt.Errorf("reading mapping folder %s: %d files, at most %d", dir, len(names), MaxFiles)
	}
	out := make([]source, 0, len(names))
	for _, n := range names {
		p := filepath.Join(dir, n)
		doc, err := readBounded(p)
		if err != nil {
			return nil, err
		}
		out = append(out, source{p, doc})
	}
	return out, nil
}

func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading mapping file: %w", err)
	}
	defer f.Close()
	doc, err := io.ReadAll(io.LimitReader(f, MaxFileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("reading mapping file %s: %w", path, err)
	}
	if len(doc) > MaxFileBytes {
		return nil, fmt.Errorf("mapping file %s: larger than %d bytes", path, MaxFileBytes)
	}
	return doc, nil
}

// lineError is a problem at a line of a mapping file.
type lineError struct {
	file string
	line int
	msg  string
}

func (e *lineError) Error() string {
	if e.line > 0 {
		return fmt.Sprintf("mapping file %s:%d: %s", e.file, e.line, e.msg)
	}
	return fmt.Sprintf("mapping file %s: %s", e.file, e.msg)
}

var (
	loincRe = regexp.MustCompile(`^[0-9]{1,7}-[0-9]$`)
	refRe   = regexp.MustCompile(`^MDC_[A-Z0-9_]+$`)
)

// build overlays the sources in order.
func build(cat *catalog.Catalog, srcs []source) (*Tables, error) {
	if cat == nil {
		return nil, errors.New("building mapping tables: no metric catalogue")
	}
	t := &Tables{
		mdcMetric:   map[uint32]string{},
		mdcRefIDs:   map[string]uint32{},
		loincMetric: map[string]string{},
		mdcUnit:     map[uint32]string{},
		ucumUnit:    map[string]string{},
		ucumFold:    map[string]string{},
	}
	// The catalogue's own LOINC codes and units come first; files may
	// add to them (and override them, e.g. to retire a code).
	for _, id := range cat.IDs() {
		m, _ := cat.Lookup(id)
		if m.LOINC != "" {
			t.loincMetric[m.LOINC] = m.ID
		}
		t.ucumUnit[m.Unit] = m.Unit
		for _, u := range m.Units {
			t.ucumUnit[u.UCUM] = u.UCUM
		}
	}
	for _, s := range srcs {
		if err := t.overlay(cat, s); err != nil {
			return nil, err
		}
		t.files = append(t.files, s.name)
	}
	// Case-insensitive aliases: a code that is itself a UCUM unit wins
	// over an alias folding to the same text; otherwise the first alias in
	// sorted order (deterministic across reloads).
	aliases := make([]string, 0, len(t.ucumUnit))
	for alias := range t.ucumUnit {
		aliases = append(aliases, alias)
	}
	sort.Strings(aliases)
	for _, identity := range []bool{true, false} {
		for _, alias := range aliases {
			u := t.ucumUnit[alias]
			if (alias == u) != identity {
				continue
			}
			if _, dup := t.ucumFold[strings.ToLower(alias)]; !dup {
				t.ucumFold[strings.ToLower(alias)] = u
			}
		}
	}
	return t, nil
}

func (t *Tables) overlay(cat *catalog.Catalog, s source) error {
	var root yaml.Node
	if err := yaml.Unmarshal(s.doc, &root); err != nil {
		return &lineError{file: s.name, line: yamlErrLine(err), msg: "invalid YAML: " + err.Error()}
	}
	if len(root.Content) == 0 {
		return nil // an empty file adds nothing
	}
	var f file
	dec := yaml.NewDecoder(bytes.NewReader(s.doc))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return &lineError{file: s.name, line: yamlErrLine(err), msg: err.Error()}
	}
	if f.Version != 1 {
		return &lineError{file: s.name, line: 1, msg: fmt.Sprintf("version %d: want version: 1", f.Version)}
	}
	lines := entryLines(&root)
	for i, e := range f.Metrics {
		line := at(lines["metrics"], i)
		bad := func(format string, args ...any) error {
			return &lineError{file: s.name, line: line, msg: fmt.Sprintf("metrics[%d]: ", i) + fmt.Sprintf(format, args...)}
		}
		if _, ok := cat.Lookup(e.Metric); !ok {
			if s.name == DefaultsName {
				// A hospital's own catalogue may leave out a metric
				// the defaults map; its codes stay unmapped.
				continue
			}
			return bad("metric %q is not in the catalogue (known: %v)", e.Metric, cat.IDs())
		}
		sys, ok := CanonicalSystem(e.System)
		switch {
		case !ok || sys == SystemUCUM:
			return bad("system %q: want MDC or LOINC", e.System)
		case sys == SystemLOINC:
			if !loincRe.MatchString(e.Code) {
				return bad("LOINC code %q is not of the form 12345-6", e.Code)
			}
			if e.Ref != "" {
				return bad("ref is only for MDC codes")
			}
			t.loincMetric[e.Code] = e.Metric
		default:
			code, err := t.mdcEntry(e.Code, e.Ref)
			if err != nil {
				return bad("%v", err)
			}
			t.mdcMetric[code] = e.Metric
		}
		t.metricRows++
	}
	for i, e := range f.Units {
		line := at(lines["units"], i)
		bad := func(format string, args ...any) error {
			return &lineError{file: s.name, line: line, msg: fmt.Sprintf("units[%d]: ", i) + fmt.Sprintf(format, args...)}
		}
		if !plainCode(e.UCUM) {
			return bad("ucum %q is not a UCUM code", e.UCUM)
		}
		sys, ok := CanonicalSystem(e.System)
		switch {
		case !ok || sys == SystemLOINC:
			return bad("system %q: want MDC or UCUM", e.System)
		case sys == SystemUCUM:
			if !plainCode(e.Code) {
				return bad("code %q is not a unit code", e.Code)
			}
			if e.Ref != "" {
				return bad("ref is only for MDC codes")
			}
			t.ucumUnit[e.Code] = e.UCUM
		default:
			code, err := t.mdcEntry(e.Code, e.Ref)
			if err != nil {
				return bad("%v", err)
			}
			t.mdcUnit[code] = e.UCUM
		}
		t.unitRows++
	}
	return nil
}

// mdcEntry checks an MDC entry's code and reference id, records the
// reference id, and returns the 32-bit code.
func (t *Tables) mdcEntry(code, ref string) (uint32, error) {
	if ref != "" && (!refRe.MatchString(ref) || len(ref) > MaxCodeLen) {
		return 0, fmt.Errorf("ref %q is not an MDC reference id (MDC_...)", ref)
	}
	if code == "" {
		c, ok := t.mdcRefIDs[ref]
		if ref == "" || !ok {
			return 0, fmt.Errorf("MDC entry without code: give the numeric code (and ref %q)", ref)
		}
		return c, nil
	}
	if !isDigits(code) {
		return 0, fmt.Errorf("MDC code %q is not a number (partition × 65536 + term code)", code)
	}
	n, err := strconv.ParseUint(code, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("MDC code %q is not a 32-bit number", code)
	}
	if ref != "" {
		t.mdcRefIDs[ref] = uint32(n)
	}
	return uint32(n), nil
}

// plainCode accepts a non-empty, bounded, printable code without spaces.
func plainCode(s string) bool {
	if s == "" || len(s) > MaxCodeLen || !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if unicode.IsSpace(r) || !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

// entryLines finds the line of each entry of the top-level lists.
func entryLines(root *yaml.Node) map[string][]int {
	out := map[string][]int{}
	if root.Kind != yaml.DocumentNode || len(root.Content) == 0 || root.Content[0].Kind != yaml.MappingNode {
		return out
	}
	m := root.Content[0]
	for i := 0; i+1 < len(m.Content); i += 2 {
		key, val := m.Content[i].Value, m.Content[i+1]
		for _, item := range val.Content {
			out[key] = append(out[key], item.Line)
		}
	}
	return out
}

func at(lines []int, i int) int {
	if i < len(lines) {
		return lines[i]
	}
	return 0
}

var lineRe = regexp.MustCompile(`line (\d+)`)

// yamlErrLine digs the line out of a yaml.v3 error ("yaml: line 3: ...").
func yamlErrLine(err error) int {
	if m := lineRe.FindStringSubmatch(err.Error()); m != nil {
		n, _ := strconv.Atoi(m[1])
		return n
	}
	return 0
}
