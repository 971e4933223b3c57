package replay

import (
	"errors"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vigilhealth/vigil/ingest/waveform"
	"github.com/vigilhealth/vigil/ingest/wfdb"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// wfdb replays a WFDB record (its header at p) as waveform chunks of
// Options.ChunkSeconds per signal: tenant Options.Tenant, patient = the
// record name, device "wfdb", channel = the signal's description (the lead,
// e.g. "MLII"), starting at the header's base date and time, or at
// Options.Start when it has none.
func (rn *run) wfdb(p string) error {
	rn.st.files.Add(1)
	dir, name := filepath.Split(p)
	rec, err := wfdb.Open(dir, strings.TrimSuffix(name, ".hea"))
	if err != nil {
		return fmt.Errorf("replaying %s: %w", p, err)
	}
	h := rec.Header
	sr, c, err := rec.Frames()
	if err != nil {
		return fmt.Errorf("replaying %s: %w", p, err)
	}
	defer c.Close()
	startMs := rn.opts.Start.UnixMilli()
	if t, ok := wfdbBase(h); ok {
		startMs = t.UnixMilli()
	}
	nsig := len(h.Signals)
	frames := max(1, int(math.Round(rn.opts.ChunkSeconds*h.FreqHz)))
	buf := make([]int, frames*nsig)
	var done int64
	for k := 0; ; k++ {
		n, rerr := sr.ReadFrames(buf)
		if rerr != nil && !errors.Is(rerr, io.EOF) {
			return fmt.Errorf("replaying %s: %w", p, rerr)
		}
		if n > 0 {
			chunkStart := startMs + int64(math.Round(float64(done)*1000/h.FreqHz))
			for s := range h.Signals {
				sig := &h.Signals[s]
				vals := make([]float64, n)
				for f := 0; f < n; f++ {
					vals[f] = sig.Physical(buf[f*nsig+s])
				}
				ucum := sig.Units
				if ucum == "" {
					ucum = "mV"
				}
				ch := sig.Description
				if ch == "" {
					ch = "signal" + strconv.Itoa(s)
				}
				u := &unit{origin: p + ":" + strconv.Itoa(k) + ":" + ch, eventMs: chunkStart + int64(float64(n-1)*1000/h.FreqHz),
					chunk: &waveform.Chunk{Tenant: rn.opts.Tenant, Patient: h.Record, Device: "wfdb", Channel: ch,
						Metric: "ecg", Unit: ucum, RateHz: h.FreqHz, StartMs: chunkStart, Values: vals,
						Source: vigilv1.Source_SOURCE_REPLAY, MessageID: "replay-" + h.Record + "-" + ch + "-" + strconv.Itoa(k)}}
				if err := rn.emit(u); err != nil {
					return err
				}
			}
			done += int64(n)
		}
		if errors.Is(rerr, io.EOF) || n == 0 {
			return nil
		}
	}
}

// wfdbBase is the record's start from its header's base date and time
// ("HH:MM:SS" and "DD/MM/YYYY"), when it gives both.
func wfdbBase(h *wfdb.Header) (time.Time, bool) {
	if h.BaseDate == "" || h.BaseTime == "" {
		return time.Time{}, false
	}
	t, err := time.Parse("15:04:05 02/01/2006", h.BaseTime+" "+h.BaseDate)
	if err != nil {
		return time.Time{}, false
	}
	return t.UTC(), true
}
