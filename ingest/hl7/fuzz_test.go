package hl7

import (
	"testing"
	"time"

	"github.com/vigilhealth/vigil/ingest/mapping"
)

// FuzzHL7Parse feeds arbitrary bytes to the parser, and what parses to the
// field accessors, the ORU and ADT decoders and the ACK builder: no panic,
// no hang, and what comes out stays bounded by what went in.
func FuzzHL7Parse(f *testing.F) {
	for _, b := range datasetMessages(f) {
		f.Add(b)
	}
	f.Add([]byte(pcdSample))
	f.Add([]byte(pcdWaveform))
	f.Add([]byte("MSH|^~\\&|a|b|c|d|20240101||ORU^R01|1|P|2.5\rOBX|1|SN|150456^^MDC||>^5|\\X0\\|||||F|||2024\r"))
	f.Add([]byte("MSH#*!$%#\rPID###a*b!c%d\r"))
	dec := testDecoder(mapping.Default())
	dec.Waveforms = true
	now := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC).UnixMilli()
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := Parse(data)
		if err != nil {
			if _, ok := err.(*ParseError); !ok {
				t.Fatalf("error %T", err)
			}
			return
		}
		total := 0
		for i := 0; i < m.Len(); i++ {
			s := m.Segment(i)
			_ = s.ID()
			for fi := 1; fi <= s.NumFields() && fi < 64; fi++ {
				fl := s.Field(fi)
				for r := 0; r < fl.Reps() && r < 8; r++ {
					for c := 1; c < 6; c++ {
						v := fl.Rep(r).Component(c).Sub(1).String()
						total += len(v)
					}
				}
			}
		}
		h := ReadHeader(m)
		res := dec.DecodeORU(m, Env{Tenant: "t", NowMs: now})
		if res.Samples+len(res.Waveforms) > m.Len() {
			t.Fatalf("%d samples from %d segments", res.Samples, m.Len())
		}
		_, _ = DecodeADT(m, h.Trigger, nil, now) // must not panic
		ack := BuildACK(nil, h, AR, res.Issues, time.Unix(0, 0), "x")
		if len(ack) > 64<<10+4*len(data) {
			t.Fatalf("ack of %d bytes for %d input bytes", len(ack), len(data))
		}
		if _, err := Parse(ack); err != nil {
			t.Fatalf("our own ACK does not parse: %v\n%q", err, ack)
		}
	})
}
