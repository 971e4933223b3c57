// Package waveform takes sampled waveforms (ECG) from the ingest paths (HTTP
// chunks, HL7 PCD-01 OBX of type NA), detects beats and publishes the derived
// RR intervals as canonical samples.
package waveform

import (
	"context"

	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
)

// Chunk is a run of equally spaced waveform samples of one channel of one
// device, as a decoder produced it. The receiver owns Values after the call.
type Chunk struct {
	Tenant, Patient, Device string
	// Channel names the lead or channel (e.g. "MLII", OBX-4).
	Channel string
	// Metric is the waveform's kind, e.g. "ecg".
	Metric string
	// Unit of Values (UCUM), e.g. "mV".
	Unit string
	// RateHz is the sampling frequency.
	RateHz float64
	// StartMs is the event time of Values[0], Unix epoch milliseconds UTC.
	StartMs int64
	Values  []float64
	Source  vigilv1.Source
	// MessageID identifies the originating message (HL7 MSH-10, request id).
	MessageID string
	// Location is the bed, when known.
	Location string
}

// Sink takes waveform chunks. Chunk blocks until what the chunk produced is
// durable in Kafka (or fails); it is safe for concurrent use.
type Sink interface {
	Chunk(ctx context.Context, c *Chunk) error
}
