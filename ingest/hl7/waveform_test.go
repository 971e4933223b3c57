package hl7

import (
	"strings"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/ingest/mapping"
	"github.com/vigilhealth/vigil/ingest/validate"
)

// pcdWaveform is a PCD-01 message with two ECG leads (NA) as monitor
// gateways send them: each waveform followed by its MDC_ATTR_SAMP_RATE
// observation under its OBX-4, lead II in microvolts and with its rate
// given as a sample period (MDC_ATTR_TIME_PD_SAMP, 4 ms).
const pcdWaveform = "MSH|^~\\&|GW|ICU-EAST|VIGIL|HOSP|20240301101500+0000||ORU^R01^ORU_R01|WAVE-1|P|2.6\r" +
	"PID|||MRN-42^^^HOSP^MR\r" +
	"PV1||I|ICU^12^A\r" +
	"OBR|1|W1^GW|W1^GW|182777000^monitoring of patient^SNOMED-CT|||20240301101500+0000\r" +
	"OBX|1||69965^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|1.0.0.0|||||||X|||||||MON-7^^MON-7^EUI-64\r" +
	"OBX|2|NA|131329^MDC_ECG_ELEC_POTL_I^MDC|1.1.1.131329|0.1^0.2^-0.1^0.05|266418^MDC_DIM_MILLI_VOLT^MDC|||||F|||20240301101455.000+0000\r" +
	"OBX|3|NM|0^MDC_ATTR_SAMP_RATE^MDC|1.1.1.131329.1|500|264608^MDC_DIM_PER_SEC^MDC|||||F\r" +
	"OBX|4|NM|67981^MDC_ATTR_TIME_PD_SAMP^MDC|1.1.1.131330.1|4|264338^MDC_DIM_MILLI_SEC^MDC|||||F\r" +
	"OBX|5|NA|131330^MDC_ECG_ELEC_POTL_II^MDC|1.1.1.131330|100^200^300|266419^MDC_DIM_MICRO_VOLT^MDC|||||F|||20240301101455.000+0000\r" +
	"OBX|6|NM|147842^MDC_ECG_HEART_RATE^MDC|1.1.1.1|72|264864^MDC_DIM_BEAT_PER_MIN^MDC|||||R|||20240301101455+0000\r"

func TestDecodeWaveforms(t *testing.T) {
	m, err := Parse([]byte(pcdWaveform))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2024, 3, 1, 10, 15, 1, 0, time.UTC).UnixMilli()
	d := testDecoder(mapping.Default())
	d.Waveforms = true
	res := d.DecodeORU(m, Env{Tenant: "h1", NowMs: now})
	if len(res.Issues) != 0 || res.Samples != 1 || len(res.Waveforms) != 2 {
		t.Fatalf("issues %v, samples %d, waveforms %d", res.Issues, res.Samples, len(res.Waveforms))
	}
	start := time.Date(2024, 3, 1, 10, 14, 55, 0, time.UTC).UnixMilli()
	w := res.Waveforms[0]
	c := w.Chunk
	if w.Sequence != 2 || c.Metric != "ecg" || c.Unit != "mV" || c.RateHz != 500 || c.StartMs != start || c.Channel != "1.1.1.131329" ||
		c.Device != "MON-7" || c.Patient != "MRN-42" || c.Tenant != "h1" || c.MessageID != "WAVE-1" || c.Location != "bed:ICU/12/A" ||
		len(c.Values) != 4 || c.Values[1] != 0.2 || c.Values[2] != -0.1 {
		t.Errorf("lead I: %+v", c)
	}
	c = res.Waveforms[1].Chunk
	if c.Unit != "uV" || c.RateHz != 250 || len(c.Values) != 3 || c.Values[2] != 300 {
		t.Errorf("lead II: %+v", c)
	}

	// Without the waveform path: refused, unsupported_value on OBX-2.
	d.Waveforms = false
	res = d.DecodeORU(m, Env{Tenant: "h1", NowMs: now})
	if len(res.Waveforms) != 0 || len(res.Issues) != 2 || res.Issues[0].Path() != "OBX[2]-2" || res.Issues[0].Reason != validate.UnsupportedValue {
		t.Errorf("without waveforms: %v", res.Issues)
	}

	// No rate, a bad value: refused with the OBX located.
	d.Waveforms = true
	noRate := strings.Replace(strings.Replace(pcdWaveform, "MDC_ATTR_SAMP_RATE", "MDC_ATTR_OTHER", 1), "|4|264338^", "|x|264338^", 1)
	noRate = strings.Replace(noRate, "100^200^300", "100^2x0^300", 1)
	m, err = Parse([]byte(noRate))
	if err != nil {
		t.Fatal(err)
	}
	res = d.DecodeORU(m, Env{Tenant: "h1", NowMs: now})
	got := map[string]validate.Reason{}
	for _, is := range res.Issues {
		got[is.Path()] = is.Reason
	}
	if len(res.Waveforms) != 0 || got["OBX[2]-5"] != validate.UnsupportedValue || got["OBX[5]-5"] != validate.UnsupportedValue {
		t.Errorf("no rate: %v", got)
	}
}
