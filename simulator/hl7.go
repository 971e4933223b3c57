package simulator

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// The PCD-01 messages of the bed gateway, written as a real IHE PCD device
// observation reporter would: ORU^R01 with one OBX per observation, the
// observation and unit coded in IEEE 11073-10101 (MDC) where the bedside
// monitor measures it and in LOINC/UCUM where a monitor's MDC term would be
// a guess (inspired oxygen and oxygen flow come from the ventilator or
// flowmeter and are charted; we send LOINC).

// mdcTerm is an observation's OBX-3 and OBX-6 coding.
type mdcTerm struct {
	obx3, obx6 string
}

// pcdTerms maps the catalogue metrics the beds measure onto their codes.
// MDC codes are the 32-bit context-free codes (partition × 65536 + term
// code) of IEEE 11073-10101: SCADA partition 2 (e.g. MDC_ECG_HEART_RATE =
// 2::16770 = 147842) and dimensions partition 4 (MDC_DIM_BEAT_PER_MIN =
// 4::2720 = 264864).
var pcdTerms = map[string]mdcTerm{
	"heart_rate":             {"147842^MDC_ECG_HEART_RATE^MDC", "264864^MDC_DIM_BEAT_PER_MIN^MDC"},
	"spo2":                   {"150456^MDC_PULS_OXIM_SAT_O2^MDC", "262688^MDC_DIM_PERCENT^MDC"},
	"respiratory_rate":       {"151562^MDC_RESP_RATE^MDC", "264928^MDC_DIM_RESP_PER_MIN^MDC"},
	"systolic_bp":            {"150021^MDC_PRESS_BLD_NONINV_SYS^MDC", "266016^MDC_DIM_MMHG^MDC"},
	"diastolic_bp":           {"150022^MDC_PRESS_BLD_NONINV_DIA^MDC", "266016^MDC_DIM_MMHG^MDC"},
	"mean_arterial_pressure": {"150023^MDC_PRESS_BLD_NONINV_MEAN^MDC", "266016^MDC_DIM_MMHG^MDC"},
	"body_temperature":       {"150364^MDC_TEMP_BODY^MDC", "268192^MDC_DIM_DEGC^MDC"},
	"fio2":                   {"3150-0^Inhaled oxygen concentration^LN", "%^percent^UCUM"},
	"oxygen_flow":            {"3151-8^Inhaled oxygen flow rate^LN", "L/min^liter per minute^UCUM"},
}

// unmappedOBX3 is the observation code of injected unmapped observations: a
// code from no table, as a gateway sends after a firmware update.
const unmappedOBX3 = "999999^VIGIL_SIM_UNMAPPED^MDC"

// hl7Time formats t as an HL7 DTM with milliseconds and UTC offset.
func hl7Time(t time.Time) string {
	return t.UTC().Format("20060102150405.000") + "+0000"
}

// bedLocation is the bed's PV1-3 (point of care^room^bed).
func bedLocation(bed int, moved bool) string {
	b := "1"
	if moved {
		b = "2"
	}
	return fmt.Sprintf("ICU^%02d^%s", bed, b)
}

// oruMessage builds one PCD-01 ORU^R01 carrying rs (one device, one
// patient). facility is MSH-4 (the tenant), ctl MSH-10. MSH-15 and MSH-16
// are empty: the gateway asks for original-mode acknowledgements (AA only
// once the receiver has the data).
func oruMessage(facility, ctl, location string, rs []Reading, unmapped bool) []byte {
	var b strings.Builder
	at := time.UnixMilli(rs[0].TimeMs)
	fmt.Fprintf(&b, "MSH|^~\\&|VIGIL_SIM_GW^00A0C9FFFE000001^EUI-64|%s|VIGIL|VIGIL|%s||ORU^R01^ORU_R01|%s|P|2.6||||||UNICODE UTF-8|||IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO\r",
		facility, hl7Time(time.Now()), ctl)
	fmt.Fprintf(&b, "PID|||%s^^^%s^MR\r", rs[0].Patient, facility)
	fmt.Fprintf(&b, "PV1||I|%s\r", location)
	fmt.Fprintf(&b, "OBR|1|%s^VIGIL_SIM_GW|%s^VIGIL_SIM_GW|182777000^monitoring of patient^SNOMED-CT|||%s\r", ctl, ctl, hl7Time(at))
	n := 0
	for _, r := range rs {
		t, ok := pcdTerms[r.Metric]
		if !ok {
			continue
		}
		n++
		fmt.Fprintf(&b, "OBX|%d|NM|%s|1.1.1.%d|%s|%s|||||R|||%s||||%s^^00A0C9FFFE000001^EUI-64\r",
			n, t.obx3, n, strconv.FormatFloat(r.Value, 'f', -1, 64), t.obx6, hl7Time(time.UnixMilli(r.TimeMs)), r.Device)
	}
	if unmapped {
		n++
		fmt.Fprintf(&b, "OBX|%d|NM|%s|1.1.1.%d|42|262688^MDC_DIM_PERCENT^MDC|||||R|||%s||||%s^^00A0C9FFFE000001^EUI-64\r",
			n, unmappedOBX3, n, hl7Time(at), rs[0].Device)
	}
	return []byte(b.String())
}

// malformedMessage is an injected message a broken gateway might send: the
// MSH segment lost its encoding characters.
func malformedMessage(facility, ctl string) []byte {
	return []byte("MSH|" + facility + "|ORU^R01|" + ctl + "\rOBX|1|NM|147842^MDC_ECG_HEART_RATE^MDC||not-a-number\r")
}

// adtMessage builds an ADT^A01 (admit) or ^A02 (transfer) of patient to
// location at t; prior is the previous location (PV1-6) of a transfer.
func adtMessage(facility, ctl, event, patient, location, prior string, t time.Time) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "MSH|^~\\&|VIGIL_SIM_ADT|%s|VIGIL|VIGIL|%s||ADT^%s^ADT_A01|%s|P|2.6\r", facility, hl7Time(time.Now()), event, ctl)
	fmt.Fprintf(&b, "EVN|%s|%s\r", event, hl7Time(t))
	fmt.Fprintf(&b, "PID|||%s^^^%s^MR||Simulated^%s\r", patient, facility, patient)
	fmt.Fprintf(&b, "PV1||I|%s|||%s\r", location, prior)
	return []byte(b.String())
}

// ackCode extracts MSA-1 (AA, AE, AR, CA, CE, CR) from an HL7 ACK, and the
// text of ERR-8 or MSA-3 when present.
func ackCode(ack []byte) (code, text string) {
	for _, seg := range strings.FieldsFunc(string(ack), func(r rune) bool { return r == '\r' || r == '\n' }) {
		if len(seg) < 4 {
			continue
		}
		sep := string(seg[3])
		f := strings.Split(seg, sep)
		switch f[0] {
		case "MSA":
			if len(f) > 1 {
				code = f[1]
			}
			if len(f) > 3 && text == "" {
				text = f[3]
			}
		case "ERR":
			if len(f) > 8 && f[8] != "" {
				text = f[8]
			}
		}
	}
	return code, text
}
