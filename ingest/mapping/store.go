package mapping

import (
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigilhealth/vigil/internal/catalog"
	"github.com/vigilhealth/vigil/internal/stage"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// DefaultReload is the polling interval of a Store when none is given.
const DefaultReload = 5 * time.Second

// DefaultMaxUnmappedCodes bounds the distinct (system, code) label pairs of
// vigil_ingest_unmapped_codes_total; later codes count under code="other".
const DefaultMaxUnmappedCodes = 500

// maxLabelLen bounds a code as a metric label, in bytes.
const maxLabelLen = 64

// Option configures a Store.
type Option func(*Store)

// WithCatalog checks metric ids against cat (the hospital's catalogue,
// ingest.catalog) instead of the embedded one.
func WithCatalog(cat *catalog.Catalog) Option {
	return func(s *Store) {
		if cat != nil {
			s.cat = cat
		}
	}
}

// WithMaxUnmappedCodes sets the bound on distinct unmapped (system, code)
// label pairs (default DefaultMaxUnmappedCodes).
func WithMaxUnmappedCodes(n int) Option {
	return func(s *Store) {
		if n > 0 {
			s.maxUnmapped = n
		}
	}
}

// Store holds the current Tables and reloads them when the files of its
// folder change. Tables, Unmapped and Reload are safe for concurrent use; a
// lookup on the Tables a caller got stays consistent even while a reload
// swaps in new ones.
type Store struct {
	dir         string
	reload      time.Duration
	cat         *catalog.Catalog
	log         *slog.Logger
	maxUnmapped int

	cur atomic.Pointer[Tables]

	mu          sync.Mutex // guards fingerprint, lastErr and reloads
	fingerprint [32]byte
	lastErr     string

	umu        sync.Mutex // guards unmapped and overflowed
	unmapped   map[string]struct{}
	overflowed bool

	reloads       *prometheus.CounterVec
	entries       *prometheus.GaugeVec
	unmappedTotal *prometheus.CounterVec

	closeOnce sync.Once
}

// NewStore loads the defaults overlaid with the mapping files of dir (empty:
// defaults only) and registers the mapping metrics on deps.Metrics. It fails
// when the files are invalid, naming file and line, so that a bad table
// stops a start rather than running without it. reload is the polling
// interval of Run (≤ 0: DefaultReload).
func NewStore(dir string, reload time.Duration, deps stage.Deps, opts ...Option) (*Store, error) {
	deps = deps.WithDefaults()
	if reload <= 0 {
		reload = DefaultReload
	}
	s := &Store{dir: dir, reload: reload, cat: catalog.Default(), log: deps.Log,
		maxUnmapped: DefaultMaxUnmappedCodes, unmapped: map[string]struct{}{}}
	for _, o := range opts {
		o(s)
	}
	s.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_ingest_mapping_reloads_total",
		Help: "Loads of the mapping tables from ingest.mapping_dir, by result (ok, error; on error the previous tables stay in force).",
	}, []string{"result"})
	s.entries = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "vigil_ingest_mapping_entries",
		Help: "Entries of the mapping tables in force, by kind (metric, unit).",
	}, []string{"kind"})
	s.unmappedTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_ingest_unmapped_codes_total",
		Help: "Codes without an entry in the mapping tables, by ingest source, code system and code (code=\"other\" once the distinct codes exceed the bound).",
	}, []string{"source", "system", "code"})
	fp, t, err := s.load()
	if err != nil {
		return nil, err
	}
	if err := stage.Register(deps.Metrics, "mapping metrics", s.reloads, s.entries, s.unmappedTotal); err != nil {
		return nil, err
	}
	s.swap(fp, t)
	s.reloads.WithLabelValues("ok").Inc()
	s.reloads.WithLabelValues("error")
	if dir != "" {
		s.log.Info("mapping tables loaded", "dir", dir, "files", len(t.files)-1)
	}
	return s, nil
}

// Tables returns the tables in force. The snapshot is immutable: keep it for
// one message so that all of its codes are mapped by the same tables.
func (s *Store) Tables() *Tables { return s.cur.Load() }

// Dir returns the mapping folder ("" when only the defaults are used).
func (s *Store) Dir() string { return s.dir }

// Run polls the mapping folder every reload interval and swaps in new tables
// when its files changed, until ctx ends (then it returns nil). A bad file is
// logged and counted, and the previous tables stay in force. With no folder
// it just waits for ctx.
func (s *Store) Run(ctx context.Context) error {
	if s.dir == "" {
		<-ctx.Done()
		return nil
	}
	tick := time.NewTicker(s.reload)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			_, _ = s.Reload()
		}
	}
}

// Reload re-reads the folder now. It reports whether new tables were swapped
// in; on an invalid file it returns the error, counts it and keeps the
// tables in force. Unchanged files are not parsed again.
func (s *Store) Reload() (changed bool, err error) {
	if s.dir == "" {
		return false, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	fp, err := fingerprint(s.dir)
	if err == nil && fp == s.fingerprint {
		return false, nil
	}
	var t *Tables
	if err == nil {
		fp, t, err = s.load()
	}
	if err != nil {
		s.reloads.WithLabelValues("error").Inc()
		if msg := err.Error(); msg != s.lastErr {
			// Logged once per distinct problem, not every poll.
			s.log.Error("mapping tables not reloaded: keeping the previous ones", "dir", s.dir, "err", err)
			s.lastErr = msg
		}
		return false, err
	}
	s.lastErr = ""
	s.swapLocked(fp, t)
	s.reloads.WithLabelValues("ok").Inc()
	m, u := t.Len()
	s.log.Info("mapping tables reloaded", "dir", s.dir, "files", len(t.files)-1, "metric_entries", m, "unit_entries", u)
	return true, nil
}

// load reads the folder and builds tables; the fingerprint is of what was
// read (so a file changing between fingerprint and read is seen next time).
func (s *Store) load() ([32]byte, *Tables, error) {
	srcs, err := readDir(s.dir)
	if err != nil {
		return [32]byte{}, nil, err
	}
	t, err := build(s.cat, append([]source{{DefaultsName, defaultYAML}}, srcs...))
	if err != nil {
		return [32]byte{}, nil, err
	}
	return hashSources(srcs), t, nil
}

func (s *Store) swap(fp [32]byte, t *Tables) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.swapLocked(fp, t)
}

func (s *Store) swapLocked(fp [32]byte, t *Tables) {
	s.fingerprint = fp
	s.cur.Store(t)
	m, u := t.Len()
	s.entries.WithLabelValues("metric").Set(float64(m))
	s.entries.WithLabelValues("unit").Set(float64(u))
}

// fingerprint hashes the names and contents of the folder's mapping files.
// Contents, not modification times: an edit within the file system's time
// resolution, or a file replaced by an older copy, is still seen.
func fingerprint(dir string) ([32]byte, error) {
	srcs, err := readDir(dir)
	if err != nil {
		return [32]byte{}, err
	}
	return hashSources(srcs), nil
}

func hashSources(srcs []source) [32]byte {
	h := sha256.New()
	for _, s := range srcs {
		fmt.Fprintf(h, "%s\x00%d\x00", filepath.Base(s.name), len(s.doc))
		h.Write(s.doc)
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

// Unmapped counts a code that had no entry (an observation or unit code) in
// vigil_ingest_unmapped_codes_total{source,system,code}. The system is
// reported canonically (MDC, LOINC, UCUM) or as sent (bounded); the code is
// bounded to 64 bytes. After the bound on distinct (system, code) pairs,
// further new pairs count under code="other", and that is logged once. Safe
// for concurrent use; it does not block.
func (s *Store) Unmapped(source vigilv1.Source, system, code string) {
	sys, ok := CanonicalSystem(system)
	if !ok {
		sys = labelValue(system)
		if sys == "" {
			sys = "none"
		}
	}
	code = labelValue(code)
	key := sys + "\x00" + code
	s.umu.Lock()
	if _, seen := s.unmapped[key]; !seen {
		if len(s.unmapped) >= s.maxUnmapped {
			if !s.overflowed {
				s.overflowed = true
				s.log.Warn("more distinct unmapped codes than the metric bound: further ones are counted under code=\"other\" (see the dead-letter topic for each code)",
					"bound", s.maxUnmapped, "first_over", sys+":"+code)
			}
			code = "other"
		} else {
			s.unmapped[key] = struct{}{}
		}
	}
	s.umu.Unlock()
	s.unmappedTotal.WithLabelValues(source.Label(), sys, code).Inc()
}

// labelValue makes outside text a bounded, valid-UTF-8 label value.
func labelValue(s string) string {
	s = strings.TrimSpace(s)
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "?")
	}
	if len(s) > maxLabelLen {
		cut := maxLabelLen
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut]
	}
	return s
}

// Close releases nothing but is part of the stage contract; it is
// idempotent.
func (s *Store) Close(context.Context) error {
	s.closeOnce.Do(func() {})
	return nil
}

var _ stage.Stage = (*Store)(nil)
