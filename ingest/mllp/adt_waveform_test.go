package mllp

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vigilhealth/vigil/ingest/binding"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/ingest/waveform"
	"github.com/vigilhealth/vigil/ingest/wfdb"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
)

func hl7Time(t time.Time) string { return t.UTC().Format("20060102150405.000") + "+0000" }

func adtMsg(trigger, id, patient, bed string, at time.Time) string {
	return "MSH|^~\\&|ADT|ICU-EAST|VIGIL|HOSP|" + hl7Time(at) + "||ADT^" + trigger + "|" + id + "|P|2.5\r" +
		"EVN|" + trigger + "|" + hl7Time(at) + "\r" +
		"PID|||" + patient + "^^^HOSP^MR||Roe^Richard\r" +
		"PV1||I|" + bed + "\r"
}

// ecgMsg is a PCD-01 ORU^R01 from a bed-only monitor (no PID-3, bed
// ICU^5^B) carrying one ECG lead as an NA observation and its sample rate
// as the companion MDC_ATTR_SAMP_RATE observation that follows it.
func ecgMsg(id string, at time.Time, rateHz float64, values []float64) string {
	var v strings.Builder
	for i, x := range values {
		if i > 0 {
			v.WriteByte('^')
		}
		fmt.Fprintf(&v, "%.3f", x)
	}
	return "MSH|^~\\&|GW|ICU-EAST|VIGIL|HOSP|" + hl7Time(at) + "||ORU^R01^ORU_R01|" + id + "|P|2.6\r" +
		"PID|||||Unknown\r" +
		"PV1||I|ICU^5^B\r" +
		"OBR|1|" + id + "^GW|" + id + "^GW|182777000^monitoring of patient^SNOMED-CT|||" + hl7Time(at) + "\r" +
		"OBX|1||69965^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|1.0.0.0|||||||X|||||||MON-5B^^MON-5B^EUI-64\r" +
		"OBX|2|NA|131330^MDC_ECG_ELEC_POTL_II^MDC|1.1.1.131330|" + v.String() + "|266418^MDC_DIM_MILLI_VOLT^MDC|||||F|||" + hl7Time(at) + "\r" +
		fmt.Sprintf("OBX|3|NM|0^MDC_ATTR_SAMP_RATE^MDC|1.1.1.131330.1|%g|264608^MDC_DIM_PER_SEC^MDC|||||F\r", rateHz)
}

// TestADTAndWaveformsOverMLLP wires the listener to a real binding store
// and waveform processor: an ADT^A01 over MLLP binds the bed, 30 s of the
// MIT-BIH record 100 ECG sent as PCD-01 NA observations by the bed's
// monitor (no PID-3) becomes rr_interval samples of the admitted patient;
// a waveform the processor cannot take is refused (AR, ERR on OBX-5, dead
// letter); after an ADT^A03 discharge the bed's samples are unbound.
func TestADTAndWaveformsOverMLLP(t *testing.T) {
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, "")
	reg := prometheus.NewRegistry()
	pub, err := publish.New(cfg, stage.Deps{Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close(context.Background()) })
	store, err := binding.New(cfg, stage.Deps{Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- store.Run(sctx) }()
	t.Cleanup(func() { stop(); <-done; _ = store.Close(context.Background()) })
	proc, err := waveform.NewProcessor(pub, waveform.Options{MaxChannels: 16, MaxChunkSamples: 1 << 16}, stage.Deps{Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	srv := startServer(t, cfg, reg, Options{Publisher: pub, Binder: store, Waveform: proc})
	c := dial(t, srv.Addr())

	t0 := time.Now().Add(-5 * time.Minute).Truncate(time.Second)
	if code, _ := msa(c.roundTrip(adtMsg("A01", "ADM-1", "MRN-W", "ICU^5^B", t0.Add(-time.Hour)))); code != "AA" {
		t.Fatalf("ADT^A01: %s", code)
	}
	if p, ok := store.Resolve("default", "bed:ICU/5/B", t0.UnixMilli()); !ok || p != "MRN-W" {
		t.Fatalf("bed bound to %q %v after ADT^A01, want MRN-W", p, ok)
	}

	// 30 s of lead MLII of record 100 (360 Hz) in three 10 s messages.
	dir := testenv.Dataset(t, "mitbih-100")
	rec, err := wfdb.Open(dir, "100")
	if err != nil {
		t.Fatal(err)
	}
	sig, err := rec.ReadPhysical()
	if err != nil {
		t.Fatal(err)
	}
	anns, err := wfdb.ReadAnnotations(dir, "100", "atr", 0)
	if err != nil {
		t.Fatal(err)
	}
	fs := rec.Header.FreqHz
	n := int(10 * fs)
	for i := 0; i < 3; i++ {
		at := t0.Add(time.Duration(i) * 10 * time.Second)
		ack := c.roundTrip(ecgMsg(fmt.Sprintf("ECG-%d", i), at, fs, sig[0][i*n:(i+1)*n]))
		if code, ctl := msa(ack); code != "AA" || ctl != fmt.Sprintf("ECG-%d", i) || len(errs(ack)) != 0 {
			t.Fatalf("ECG-%d: %s %s %v", i, code, ctl, errs(ack))
		}
	}
	beats := 0
	for _, a := range anns {
		if a.Type.IsBeat() && a.Sample < int64(3*n) {
			beats++
		}
	}
	rr := 0
	for _, b := range readBatches(t, broker, cfg.Kafka.Topics.Samples) {
		for _, s := range b.Samples {
			if s.Metric != "rr_interval" {
				continue
			}
			rr++
			if b.Patient != "MRN-W" || b.Device != "MON-5B" || s.Value < 200 || s.Value > 3000 {
				t.Errorf("rr_interval %v of batch %s/%s", s.Value, b.Patient, b.Device)
			}
		}
	}
	// The last beat is confirmed with the next chunk; the first has no
	// predecessor.
	if rr < beats-3 || rr > beats-1 {
		t.Errorf("%d rr_interval samples for %d annotated beats", rr, beats)
	}
	if got := testutil.ToFloat64(srv.h.m.waveforms.WithLabelValues("ok")); got != 3 {
		t.Errorf("waveforms ok %v, want 3", got)
	}

	// A 50 Hz ECG: below what the detector takes.
	ack := c.roundTrip(ecgMsg("ECG-SLOW", t0, 50, sig[0][:500]))
	if code, _ := msa(ack); code != "AR" || len(errs(ack)) != 1 || !strings.HasPrefix(errs(ack)[0], "OBX^2^5|102|E|out_of_range|") {
		t.Errorf("50 Hz ECG: %s %v, want AR with ERR OBX^2^5 out_of_range", code, errs(ack))
	}

	// Discharge: the bed is free, its monitor's samples are unbound.
	if code, _ := msa(c.roundTrip(adtMsg("A03", "DIS-1", "MRN-W", "ICU^5^B", t0.Add(time.Minute)))); code != "AA" {
		t.Fatalf("ADT^A03: %s", code)
	}
	if p, ok := store.Resolve("default", "bed:ICU/5/B", t0.Add(2*time.Minute).UnixMilli()); ok {
		t.Errorf("bed still bound to %q after ADT^A03", p)
	}
	ack = c.roundTrip(ecgMsg("ECG-LATE", t0.Add(2*time.Minute), fs, sig[0][:n]))
	if code, _ := msa(ack); code != "AR" || len(errs(ack)) != 1 || !strings.Contains(errs(ack)[0], "|unbound_device|") {
		t.Errorf("after discharge: %s %v, want AR unbound_device", code, errs(ack))
	}
	reasons := map[string]string{}
	for _, l := range readLetters(t, broker, cfg.Kafka.Topics.DeadLetter) {
		reasons[l.MessageId] = l.Reason + " " + l.Field
	}
	if reasons["ECG-SLOW"] != "out_of_range OBX[2]-5" || reasons["ECG-LATE"] != "unbound_device PID-3" {
		t.Errorf("dead letters %v", reasons)
	}
}
