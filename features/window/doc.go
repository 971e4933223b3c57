// Package window is Vigil's event-time window engine and feature
// catalogue: per patient and metric, tumbling, hopping and session windows
// configured as data (Spec, spec.yaml), closed by a per-patient watermark
// (newest event time minus out-of-orderness), corrected by late samples
// inside the allowed lateness, and turned into features (count, mean, min,
// max, standard deviation, last, median and percentiles, least-squares
// slope, time since last sample, completeness; derived mean arterial
// pressure, pulse pressure, shock index, SpO2 desaturation events and
// their hourly index, wear time, time-domain HRV) delivered as Arrow record
// batches (Batch, Schema).
//
// Engine (compiled from a Spec) is immutable and safe for concurrent use;
// a Patient (one patient's state) and a Batch belong to one goroutine. The
// engine reads no clock: processing-time decisions (idle timeouts,
// shutdown) are the caller's, who calls Idle or Flush. See engine.go for
// the pane design and the watermark rules.
package window

// Start returns the start (Unix ms) of the window of size sizeMs that holds
// event time t, aligned to the epoch (floor division, so times before 1970
// align too).
func Start(t, sizeMs int64) int64 {
	s := t / sizeMs * sizeMs
	if s > t { // negative t: Go truncates toward zero
		s -= sizeMs
	}
	return s
}
