package main

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vigilhealth/vigil/ingest/hl7"
	"github.com/vigilhealth/vigil/ingest/mllp"
	"github.com/vigilhealth/vigil/internal/testenv"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

// mllpConn is one HL7 sender's MLLP connection.
type mllpConn struct {
	t *testing.T
	c net.Conn
	r *mllp.Reader
}

func dialMLLP(t *testing.T, addr string) *mllpConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &mllpConn{t: t, c: c, r: mllp.NewReader(c, 1<<20)}
}

func (m *mllpConn) write(msg string) {
	m.t.Helper()
	if _, err := m.c.Write(mllp.AppendFrame(nil, []byte(msg))); err != nil {
		m.t.Fatal(err)
	}
}

// send writes one framed message and returns the ACK's MSA-1, MSA-2 and
// ERR segments.
func (m *mllpConn) send(msg string) (code, control string, errs []string) {
	m.t.Helper()
	m.write(msg)
	_ = m.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	b, err := m.r.Next()
	if err != nil {
		m.t.Fatalf("reading ack: %v", err)
	}
	ack, err := hl7.Parse(append([]byte(nil), b...))
	if err != nil {
		m.t.Fatalf("ack does not parse: %v: %q", err, b)
	}
	if msa, ok := ack.First("MSA"); ok {
		code, control = msa.Field(1).String(), msa.Field(2).String()
	}
	for i := 0; i < ack.Len(); i++ {
		if s := ack.Segment(i); s.Is("ERR") {
			errs = append(errs, string(s.Raw()))
		}
	}
	return code, control, errs
}

// pcd01 is an IHE PCD-01 ORU^R01 of one monitor at t: seven vital signs
// (MDC codes and units), the monitor named on the MDS row (OBX-18), the
// patient in PID-3 unless patient is empty (a bed-only monitor), the bed
// ICU^12^A in PV1-3.
func pcd01(id, patient, device string, t time.Time, hr int) string {
	ts := t.UTC().Format("20060102150405.000") + "+0000"
	pid := "PID|||" + patient + "^^^HOSP^MR||Doe^Jane"
	if patient == "" {
		pid = "PID|||||Unknown"
	}
	return strings.Join([]string{
		"MSH|^~\\&|GW^0011223344556677^EUI-64|ICU-EAST|VIGIL|HOSP|" + ts + "||ORU^R01^ORU_R01|" + id + "|P|2.6|||NE|AL|||||IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO",
		pid,
		"PV1||I|ICU^12^A",
		"OBR|1|" + id + "^GW|" + id + "^GW|182777000^monitoring of patient^SNOMED-CT|||" + ts,
		"OBX|1||69965^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|1.0.0.0|||||||X|||||||" + device + "^^" + device + "^EUI-64",
		fmt.Sprintf("OBX|2|NM|147842^MDC_ECG_HEART_RATE^MDC|1.1.1.1|%d|264864^MDC_DIM_BEAT_PER_MIN^MDC|50-120||||R|||%s", hr, ts),
		"OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1.2.1.1|97|262688^MDC_DIM_PERCENT^MDC|90-100||||R|||" + ts,
		"OBX|4|NM|151562^MDC_RESP_RATE^MDC|1.3.1.1|16|264928^MDC_DIM_RESP_PER_MIN^MDC|||||R|||" + ts,
		"OBX|5|NM|150021^MDC_PRESS_BLD_NONINV_SYS^MDC|1.4.1.1|121|266016^MDC_DIM_MMHG^MDC|||||R|||" + ts,
		"OBX|6|NM|150022^MDC_PRESS_BLD_NONINV_DIA^MDC|1.4.1.2|79|266016^MDC_DIM_MMHG^MDC|||||R|||" + ts,
		"OBX|7|NM|150023^MDC_PRESS_BLD_NONINV_MEAN^MDC|1.4.1.3|93|266016^MDC_DIM_MMHG^MDC|||||R|||" + ts,
		"OBX|8|NM|150364^MDC_TEMP_BODY^MDC|1.5.1.1|98.6|266560^MDC_DIM_FAHR^MDC|||||R|||" + ts,
	}, "\r") + "\r"
}

// TestMLLPEndToEnd runs the platform as `vigil run` does (MLLP listener,
// stream, ClickHouse sink) and talks HL7 to it over real TCP like a
// monitor gateway: an ADT^A01 admits a patient to bed ICU^12^A; PCD-01
// messages with a patient, and from a bed-only monitor, are ACKed AA only
// once their samples are in Kafka and reach ClickHouse exactly once, also
// when the gateway, having lost an ACK, sends the same message (same
// MSH-10) again on a new connection; a malformed message gets AR with an
// ERR segment naming where it broke and lands in the dead letters.
func TestMLLPEndToEnd(t *testing.T) {
	brokerAddr, chAddr := testenv.Kafka(t), testenv.ClickHouse(t)
	_, p := startPlatform(t, brokerAddr, chAddr, testenv.Logger(t))
	addr := p.cfg.MLLP.Listen
	if strings.HasSuffix(addr, ":0") {
		t.Fatalf("mllp listener address %q: not bound", addr)
	}
	conn, err := chsink.Open(context.Background(), p.cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	t0 := time.Now().Add(-2 * time.Minute).Truncate(time.Second)
	gw := dialMLLP(t, addr)
	adt := "MSH|^~\\&|ADT|ICU-EAST|VIGIL|HOSP|" + t0.Add(-time.Hour).UTC().Format("20060102150405") + "||ADT^A01^ADT_A01|ADM-1|P|2.5\r" +
		"EVN|A01|" + t0.Add(-time.Hour).UTC().Format("20060102150405") + "\r" +
		"PID|||MRN-BED^^^HOSP^MR||Roe^Richard\rPV1||I|ICU^12^A\r"
	if code, ctl, e := gw.send(adt); code != "AA" || ctl != "ADM-1" {
		t.Fatalf("ADT^A01: %s %s %v", code, ctl, e)
	}
	const perMsg = 7
	ids := []string{"PCD-1", "PCD-2", "PCD-3"}
	for i, id := range ids {
		patient := "MRN-E2E"
		if i == 2 {
			patient = "" // bed-only monitor: the ADT binding gives the patient
		}
		if code, ctl, e := gw.send(pcd01(id, patient, "AABBCCDDEEFF0011", t0.Add(time.Duration(i)*time.Second), 70+i)); code != "AA" || ctl != id || len(e) != 0 {
			t.Fatalf("%s: %s %s %v", id, code, ctl, e)
		}
	}

	// The gateway sends PCD-4, loses the connection before the ACK
	// arrives, and sends PCD-4 again on a new connection.
	lost := dialMLLP(t, addr)
	lost.write(pcd01("PCD-4", "MRN-E2E", "AABBCCDDEEFF0011", t0.Add(10*time.Second), 90))
	_ = lost.c.Close()
	q := "SELECT count() FROM samples WHERE source = 'mllp' AND message_id = ?"
	if got := waitCount(t, conn, q, perMsg, 60*time.Second, "PCD-4"); got != perMsg {
		t.Fatalf("PCD-4 (ACK lost): %d rows, want %d", got, perMsg)
	}
	again := dialMLLP(t, addr)
	if code, ctl, e := again.send(pcd01("PCD-4", "MRN-E2E", "AABBCCDDEEFF0011", t0.Add(10*time.Second), 90)); code != "AA" || ctl != "PCD-4" {
		t.Fatalf("PCD-4 sent again: %s %s %v", code, ctl, e)
	}

	// Malformed: a segment id in lower case (segment 7 of the message).
	bad := strings.Replace(pcd01("BAD-1", "MRN-E2E", "AABBCCDDEEFF0011", t0, 70), "\rOBX|3|", "\robx|3|", 1)
	code, ctl, e := again.send(bad)
	if code != "AR" || ctl != "BAD-1" || len(e) != 1 || !strings.HasPrefix(e[0], "ERR||^7|100^") || !strings.Contains(e[0], "|E|malformed_message^") {
		t.Errorf("malformed: %s %s %v, want AR with ERR ^7 100 malformed_message", code, ctl, e)
	}

	// An MDC code the mapping tables do not know: AR, unmapped_code on
	// OBX-3, counted per code.
	unm := "MSH|^~\\&|GW|ICU-EAST|||" + t0.UTC().Format("20060102150405") + "||ORU^R01|UNM-1|P|2.6\rPID|||MRN-E2E^^^H^MR\r" +
		"OBX|1|NM|188999^MDC_NOT_A_CODE^MDC|1.1.1.1|5|262688^MDC_DIM_PERCENT^MDC|||||R|||" + t0.UTC().Format("20060102150405") + "\r"
	if code, _, e := again.send(unm); code != "AR" || len(e) != 1 || !strings.HasPrefix(e[0], "ERR||OBX^1^3|103^") || !strings.Contains(e[0], "|unmapped_code^") {
		t.Errorf("unmapped code: %s %v, want AR with ERR OBX^1^3 unmapped_code", code, e)
	}
	if n := unmappedCount(t, p, "mllp", "MDC", "188999"); n != 1 {
		t.Errorf("vigil_ingest_unmapped_codes_total{source=mllp,system=MDC,code=188999} = %v, want 1", n)
	}

	// ClickHouse: every message's samples exactly once, in the raw table
	// (no FINAL), after the sink had time to insert any duplicate.
	total := uint64(len(ids)+1) * perMsg
	if got := waitCount(t, conn, "SELECT count() FROM samples WHERE source = 'mllp'", total, 60*time.Second); got != total {
		t.Fatalf("%d mllp rows, want %d", got, total)
	}
	if got := waitCount(t, conn, "SELECT count() FROM dead_letters WHERE source = 'mllp' AND message_id = 'BAD-1' AND reason = 'malformed_message'", 1, 60*time.Second); got != 1 {
		t.Errorf("%d dead letters of BAD-1, want 1", got)
	}
	time.Sleep(2 * time.Second)
	rows, err := conn.Query(context.Background(), "SELECT message_id, patient, count() FROM samples WHERE source = 'mllp' GROUP BY message_id, patient ORDER BY message_id")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	got := map[string]string{}
	for rows.Next() {
		var id, patient string
		var n uint64
		if err := rows.Scan(&id, &patient, &n); err != nil {
			t.Fatal(err)
		}
		got[id] = fmt.Sprintf("%s×%d", patient, n)
	}
	want := map[string]string{"PCD-1": "MRN-E2E×7", "PCD-2": "MRN-E2E×7", "PCD-3": "MRN-BED×7", "PCD-4": "MRN-E2E×7"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("rows by message and patient: %v, want %v", got, want)
	}
	// The temperature was sent in °F: stored in Cel.
	var temp float64
	if err := conn.QueryRow(context.Background(), "SELECT value FROM samples WHERE message_id = 'PCD-1' AND metric = 'body_temperature'").Scan(&temp); err != nil || temp < 36.99 || temp > 37.01 {
		t.Errorf("body temperature of PCD-1: %v °C (%v), want 37", temp, err)
	}
}

// unmappedCount reads vigil_ingest_unmapped_codes_total for one code from
// the platform's registry.
func unmappedCount(t *testing.T, p *platform, source, system, code string) float64 {
	t.Helper()
	mfs, err := p.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "vigil_ingest_unmapped_codes_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["source"] == source && l["system"] == system && l["code"] == code {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}
