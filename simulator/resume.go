package simulator

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// ResumeFrom makes Run continue where an earlier run with the same mark
// file stopped: the file holds the latest simulated event time handed to
// the gateways or the HTTP API (written before they are sent), and Run
// starts its ward just after it when that is later than the pre-roll's
// start. Without it a restarted simulator sends its pre-roll again over
// simulated time an earlier run already sent, with different values (the
// ward starts afresh), and the devices without sequence numbers (HL7
// beds, FHIR spot checks) then report two measurements for one device,
// metric and instant: duplicates in the samples table. `vigil run
// --simulate` keeps the mark in its data folder. Call it before Run; the
// file is read and written by Run's goroutine only. A mark that cannot be
// read is logged and ignored; one that cannot be written is logged once.
func (s *Simulator) ResumeFrom(path string) { s.mark = &resumeMark{path: path} }

// resumeMark is the persisted end of what the simulator sent.
type resumeMark struct {
	path string
	// lastMs is the latest event time written to path; failed is set
	// once a write failed (logged once).
	lastMs int64
	failed bool
}

// load returns the event time in the mark file; ok is false when there is
// none (first run) or it cannot be read.
func (m *resumeMark) load() (last time.Time, ok bool, err error) {
	b, err := os.ReadFile(m.path)
	if errors.Is(err, fs.ErrNotExist) {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, fmt.Errorf("reading simulator mark: %w", err)
	}
	ms, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || ms <= 0 {
		return time.Time{}, false, fmt.Errorf("parsing simulator mark %s: %q is not epoch milliseconds", m.path, strings.TrimSpace(string(b)))
	}
	m.lastMs = ms
	return time.UnixMilli(ms), true, nil
}

// advance records that readings up to event time ms are about to be sent
// (write-ahead: a reading cut off by a stop is skipped on resume rather
// than sent twice). The file is replaced atomically (write then rename);
// it is not synced, so after a power loss a resume may overlap by the
// last seconds sent.
func (m *resumeMark) advance(ms int64) error {
	if ms <= m.lastMs {
		return nil
	}
	tmp := m.path + ".tmp"
	if err := os.MkdirAll(filepath.Dir(m.path), 0o750); err != nil {
		return fmt.Errorf("creating simulator mark folder: %w", err)
	}
	if err := os.WriteFile(tmp, []byte(strconv.FormatInt(ms, 10)+"\n"), 0o640); err != nil {
		return fmt.Errorf("writing simulator mark: %w", err)
	}
	if err := os.Rename(tmp, m.path); err != nil {
		return fmt.Errorf("replacing simulator mark: %w", err)
	}
	m.lastMs = ms
	return nil
}

// markSending advances the resume mark (if any) to the latest event time
// of rs, before rs is sent.
func (s *Simulator) markSending(rs []Reading) {
	if s.mark == nil || len(rs) == 0 {
		return
	}
	var last int64
	for _, r := range rs {
		last = max(last, r.TimeMs)
	}
	if err := s.mark.advance(last); err != nil && !s.mark.failed {
		s.mark.failed = true
		s.log.Warn("simulator: cannot keep its resume mark; a restart may send simulated time again", "path", s.mark.path, "err", err)
	}
}

// resumeStart returns when the ward should start: simStart, or just after
// the mark of an earlier run when that is later.
func (s *Simulator) resumeStart(simStart time.Time) time.Time {
	if s.mark == nil {
		return simStart
	}
	last, ok, err := s.mark.load()
	if err != nil {
		s.log.Warn("simulator: ignoring its resume mark", "err", err)
		return simStart
	}
	if !ok || last.Before(simStart) {
		return simStart
	}
	next := last.Truncate(time.Second).Add(time.Second)
	s.log.Info("simulator resuming after the simulated time an earlier run sent", "last_sent", last.UTC().Format(time.RFC3339), "from", next.UTC().Format(time.RFC3339))
	return next
}
