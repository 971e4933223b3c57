package simulator

import "io"

// recorder writes request bodies to a recording; the first write error
// stops it.
type recorder struct {
	w   io.Writer
	err error
}

// RecordTo makes the simulator write every request body it sends over HTTP
// to w, once per request (not per retry), as one line each: the recording
// format of ingest/replay (JSON Lines of POST /v1/samples bodies), which
// `vigil replay` plays back. Samples that simulator.gateways routes over
// MLLP, MQTT or FHIR are not recorded. Call it before Run; w is written by
// Run's goroutine only and is not closed. A write error stops recording,
// is logged, and is returned by RecordErr.
func (s *Simulator) RecordTo(w io.Writer) { s.rec = &recorder{w: w} }

// RecordErr returns the write error that stopped recording, if any. Call it
// after Run returned.
func (s *Simulator) RecordErr() error {
	if s.rec == nil {
		return nil
	}
	return s.rec.err
}

// record writes body as one line of the recording, when recording.
func (s *Simulator) record(body []byte) {
	if s.rec == nil || s.rec.err != nil {
		return
	}
	if _, err := s.rec.w.Write(append(body, '\n')); err != nil {
		s.rec.err = err
		s.log.Error("simulator: recording failed; recording stopped", "err", err)
	}
}
