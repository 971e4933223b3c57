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
// Options.ChunkSeconds per signal (at most waveform.max_chunk_samples
// values): tenant Options.Tenant, patient = the record name, device
// "wfdb", channel = the signal's description (the lead, e.g. "MLII"),
// message id "replay-<record>-<channel>-<chunk>", starting at the header's
// base date and time, or at Options.Start when it has none. Signals whose
// unit is not a voltage (blood pressure, respiration) are not ECG: they are
// skipped, logged and counted in Stats.SkippedSignals.
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
	ecgSig := make([]bool, nsig)
	for s := range h.Signals {
		if _, ok := waveform.ECGUnitScale(h.Signals[s].Units); ok {
			ecgSig[s] = true
			continue
		}
		rn.st.skippedSignals.Add(1)
		rn.log.Warn("replay: WFDB signal is not an ECG (unit not a voltage); skipped", "record", p,
			"signal", h.Signals[s].Description, "unit", h.Signals[s].Units)
	}
	frames := max(1, min(int(math.Round(rn.opts.ChunkSeconds*h.FreqHz)), rn.maxChunk))
	bytesPerFrame := int64(2 * nsig) // format 16
	if h.Signals[0].Format == 212 {
		bytesPerFrame = int64(3 * nsig / 2)
	}
	buf := make([]int, frames*nsig)
	var done int64
	for k := 0; ; k++ {
		n, rerr := sr.ReadFrames(buf)
		if rerr != nil && !errors.Is(rerr, io.EOF) {
			return fmt.Errorf("replaying %s: %w", p, rerr)
		}
		rn.st.bytes.Add(int64(n) * bytesPerFrame)
		if n > 0 {
			chunkStart := startMs + int64(math.Round(float64(done)*1000/h.FreqHz))
			for s := range h.Signals {
				if !ecgSig[s] {
					continue
				}
				sig := &h.Signals[s]
				vals := make([]float64, n) // the sink owns them
				for f := 0; f < n; f++ {
					vals[f] = sig.Physical(buf[f*nsig+s])
				}
				ch := wfdbChannel(sig, s)
				u := &unit{origin: p + ":" + strconv.Itoa(k) + ":" + ch, contentType: contentTypeWFDB,
					eventMs: chunkStart + int64(float64(n-1)*1000/h.FreqHz),
					chunk: &waveform.Chunk{Tenant: rn.opts.Tenant, Patient: h.Record, Device: "wfdb", Channel: ch,
						Metric: "ecg", Unit: sig.Units, RateHz: h.FreqHz, StartMs: chunkStart, Values: vals,
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

// wfdbChannel names signal s: its description (the lead), or "signal<s>".
func wfdbChannel(sig *wfdb.Signal, s int) string {
	if sig.Description != "" {
		return sig.Description
	}
	return "signal" + strconv.Itoa(s)
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
