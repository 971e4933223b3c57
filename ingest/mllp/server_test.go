package mllp

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/ingest/hl7"
	"github.com/vigilhealth/vigil/ingest/publish"
	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/stage"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// startServer runs the MLLP stage with a real Publisher for cfg, stopped
// (drained) when the test ends.
func startServer(tb testing.TB, cfg config.Config, reg *prometheus.Registry, opts Options) *Server {
	tb.Helper()
	deps := stage.Deps{Log: testenv.Logger(tb), Metrics: reg}
	if reg == nil {
		deps.Metrics = prometheus.NewRegistry()
	}
	if _, ok := tb.(*testing.B); ok {
		deps.Log = nil
	}
	if opts.Publisher == nil {
		pub, err := publish.New(cfg, stage.Deps{Metrics: deps.Metrics})
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { _ = pub.Close(context.Background()) })
		opts.Publisher = pub
	}
	srv, err := New(cfg, deps, opts)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("mllp server: %v", err)
		}
		_ = srv.Close(context.Background())
	})
	return srv
}

// client is one MLLP connection of a test sender.
type client struct {
	tb testing.TB
	c  net.Conn
	r  *Reader
}

func dial(tb testing.TB, addr string) *client {
	tb.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = c.Close() })
	return &client{tb: tb, c: c, r: NewReader(c, 1<<20)}
}

// send writes raw bytes (framing included) and reads one ACK per frame.
func (c *client) send(raw []byte, frames int) []*hl7.Message {
	c.tb.Helper()
	if _, err := c.c.Write(raw); err != nil {
		c.tb.Fatal(err)
	}
	var acks []*hl7.Message
	for i := 0; i < frames; i++ {
		_ = c.c.SetReadDeadline(time.Now().Add(30 * time.Second))
		b, err := c.r.Next()
		if err != nil {
			c.tb.Fatalf("reading ack %d: %v", i+1, err)
		}
		m, err := hl7.Parse(append([]byte(nil), b...))
		if err != nil {
			c.tb.Fatalf("ack %d does not parse: %v: %q", i+1, err, b)
		}
		acks = append(acks, m)
	}
	return acks
}

func (c *client) roundTrip(msg string) *hl7.Message {
	return c.send(AppendFrame(nil, []byte(msg)), 1)[0]
}

func msa(m *hl7.Message) (code, control string) {
	s, ok := m.First("MSA")
	if !ok {
		return "", ""
	}
	return s.Field(1).String(), s.Field(2).String()
}

// errs returns each ERR segment as "location|code|severity|reason|text".
func errs(m *hl7.Message) []string {
	var out []string
	for i := 0; i < m.Len(); i++ {
		s := m.Segment(i)
		if !s.Is("ERR") {
			continue
		}
		out = append(out, strings.Join([]string{string(s.Field(2).Raw()), s.Field(3).Component(1).String(),
			s.Field(4).String(), s.Field(5).Component(1).String(), s.Field(8).String()}, "|"))
	}
	return out
}

func readLetters(tb testing.TB, broker, topic string) []*vigilv1.DeadLetter {
	var out []*vigilv1.DeadLetter
	for _, r := range testenv.ReadAll(tb, broker, topic) {
		var dl vigilv1.DeadLetter
		if err := proto.Unmarshal(r.Value, &dl); err != nil {
			tb.Fatal(err)
		}
		out = append(out, &dl)
	}
	return out
}

func readBatches(tb testing.TB, broker, topic string) []*vigilv1.SampleBatch {
	var out []*vigilv1.SampleBatch
	for _, r := range testenv.ReadAll(tb, broker, topic) {
		var b vigilv1.SampleBatch
		if err := proto.Unmarshal(r.Value, &b); err != nil {
			tb.Fatal(err)
		}
		out = append(out, &b)
	}
	return out
}

// TestDatasetMessagesOverMLLP sends all 139 sample messages on one
// connection, each framed as it is in its file (\n segment separators, a
// UTF-8 byte order mark on some), with NUL padding between frames, and
// checks every ACK: ADT is accepted (AA); ORU is answered AA or, when none
// of its observations is a vital sign, AR with one ERR per refused OBX;
// every other type is refused (AR, ERR on MSH-9 with code 200) and
// dead-lettered with its raw bytes.
func TestDatasetMessagesOverMLLP(t *testing.T) {
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, "")
	reg := prometheus.NewRegistry()
	srv := startServer(t, cfg, reg, Options{})
	dir := filepath.Join(testenv.Dataset(t, "hl7v2-samples"), "messages")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 139 {
		t.Fatalf("%d messages, want 139", len(ents))
	}
	var stream []byte
	var names []string
	raws := map[string][]byte{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		raws[e.Name()] = b
		names = append(names, e.Name())
		stream = AppendFrame(stream, b)
		stream = append(stream, 0, 0, '\n')
	}
	acks := dial(t, srv.Addr()).send(stream, len(names))
	unsupported := 0
	for i, name := range names {
		m, _ := hl7.Parse(raws[name])
		h := hl7.ReadHeader(m)
		code, ctl := msa(acks[i])
		if ctl != h.ControlID {
			t.Errorf("%s: MSA-2 %q, want MSH-10 %q", name, ctl, h.ControlID)
		}
		ah := hl7.ReadHeader(acks[i])
		if ah.Type != "ACK" || ah.Version != h.Version {
			t.Errorf("%s: ACK header %+v", name, ah)
		}
		e := errs(acks[i])
		switch h.Type {
		case "ADT":
			if code != "AA" {
				t.Errorf("%s (ADT^%s): %s %v, want AA", name, h.Trigger, code, e)
			}
		case "ORU":
			if code == "AR" {
				if len(e) == 0 {
					t.Errorf("%s: AR without ERR", name)
				}
				for _, x := range e {
					if strings.HasPrefix(x, "||I||") && strings.HasSuffix(x, "more errors not listed") {
						continue
					}
					if !strings.HasPrefix(x, "OBX^") || !strings.Contains(x, "|E|") {
						t.Errorf("%s: ERR %q does not name an OBX as an error", name, x)
					}
				}
			} else if code != "AA" {
				t.Errorf("%s: %s %v", name, code, e)
			}
		default:
			unsupported++
			if code != "AR" || len(e) != 1 || !strings.HasPrefix(e[0], "MSH^1^9|200|E|unsupported_message|") {
				t.Errorf("%s (%s^%s): %s %v, want AR with ERR MSH^1^9 200 unsupported_message", name, h.Type, h.Trigger, code, e)
			}
		}
	}
	letters := readLetters(t, broker, cfg.Kafka.Topics.DeadLetter)
	got := 0
	for _, l := range letters {
		if l.Reason == "unsupported_message" {
			got++
			if len(l.Raw) == 0 || l.Field != "MSH-9" || l.Source != vigilv1.Source_SOURCE_MLLP || l.ContentType != hl7.ContentType {
				t.Errorf("dead letter %v", l)
			}
		}
	}
	if got != unsupported {
		t.Errorf("%d unsupported_message dead letters, want %d", got, unsupported)
	}
	if n := testutil.ToFloat64(srv.h.m.messages.WithLabelValues("ADT", "AA")); n < 50 {
		t.Errorf("vigil_mllp_messages_total{ADT,AA} = %v", n)
	}
}

// pcd builds a PCD-01 ORU^R01 with the vital signs of one bed at t, joined
// by sep.
func pcd(id, patient, device string, t time.Time, hr float64, sep string) string {
	ts := t.UTC().Format("20060102150405.000") + "+0000"
	segs := []string{
		"MSH|^~\\&|GW^0011223344556677^EUI-64|ICU-EAST|VIGIL|HOSP|" + ts + "||ORU^R01^ORU_R01|" + id + "|P|2.6|||NE|AL|||||IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO",
		"PID|||" + patient + "^^^HOSP^MR||Doe^Jane",
		"PV1||I|ICU^12^A",
		"OBR|1|" + id + "^GW|" + id + "^GW|182777000^monitoring of patient^SNOMED-CT|||" + ts,
		"OBX|1||69965^MDC_DEV_MON_PHYSIO_MULTI_PARAM_MDS^MDC|1.0.0.0|||||||X|||||||" + device + "^^" + device + "^EUI-64",
		fmt.Sprintf("OBX|2|NM|147842^MDC_ECG_HEART_RATE^MDC|1.1.1.1|%g|264864^MDC_DIM_BEAT_PER_MIN^MDC|50-120||||R|||%s", hr, ts),
		"OBX|3|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1.2.1.1|97|262688^MDC_DIM_PERCENT^MDC|90-100||||R|||" + ts,
		"OBX|4|NM|151562^MDC_RESP_RATE^MDC|1.3.1.1|16|264928^MDC_DIM_RESP_PER_MIN^MDC|||||R|||" + ts,
		"OBX|5|NM|150021^MDC_PRESS_BLD_NONINV_SYS^MDC|1.4.1.1|121|266016^MDC_DIM_MMHG^MDC|||||R|||" + ts,
		"OBX|6|NM|150022^MDC_PRESS_BLD_NONINV_DIA^MDC|1.4.1.2|79|266016^MDC_DIM_MMHG^MDC|||||R|||" + ts,
		"OBX|7|NM|150023^MDC_PRESS_BLD_NONINV_MEAN^MDC|1.4.1.3|93|266016^MDC_DIM_MMHG^MDC|||||R|||" + ts,
		"OBX|8|NM|150364^MDC_TEMP_BODY^MDC|1.5.1.1|37.2|268192^MDC_DIM_DEGC^MDC|||||R|||" + ts,
	}
	return strings.Join(segs, sep) + sep
}

// TestEndToEndPCD01 sends PCD-01 messages over one real TCP connection
// (segment separators \r, \n and \r\n, NUL bytes between frames, several
// messages in one write), plus a duplicate, a malformed message and one
// with an unmapped code, to the listener wired to a real Publisher on the
// test broker and to the ClickHouse sink; every sample must be on
// vigil.samples.v1 and in ClickHouse exactly once, the refusals on the
// dead-letter topic.
func TestEndToEndPCD01(t *testing.T) {
	if testing.Short() {
		t.Skip("needs ClickHouse")
	}
	broker, ch := testenv.Kafka(t), testenv.ClickHouse(t)
	cfg := testenv.Config(t, broker, ch)
	log := testenv.Logger(t)
	ctx := context.Background()
	if err := chsink.Migrate(ctx, cfg.ClickHouse, log); err != nil {
		t.Fatal(err)
	}
	sink, err := chsink.New(cfg, stage.Deps{Log: log, Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	sctx, stopSink := context.WithCancel(ctx)
	sinkDone := make(chan error, 1)
	go func() { sinkDone <- sink.Run(sctx) }()
	defer func() {
		stopSink()
		<-sinkDone
		_ = sink.Close(ctx)
	}()
	reg := prometheus.NewRegistry()
	srv := startServer(t, cfg, reg, Options{})
	c := dial(t, srv.Addr())

	t0 := time.Now().Add(-time.Minute).Truncate(time.Second)
	seps := []string{"\r", "\n", "\r\n"}
	var stream []byte
	const n = 9
	for i := 0; i < n; i++ {
		stream = append(stream, 0, 0)
		stream = AppendFrame(stream, []byte(pcd(fmt.Sprintf("E2E-%d", i), "MRN-1", "AABBCCDDEEFF0011", t0.Add(time.Duration(i)*time.Second), float64(70+i), seps[i%3])))
		stream = append(stream, '\n')
	}
	for i, ack := range c.send(stream, n) {
		if code, ctl := msa(ack); code != "AA" || ctl != fmt.Sprintf("E2E-%d", i) {
			t.Fatalf("message %d: %s %s %v", i, code, ctl, errs(ack))
		}
	}
	// The gateway did not see an ACK and sends a message again.
	if code, _ := msa(c.roundTrip(pcd("E2E-3", "MRN-1", "AABBCCDDEEFF0011", t0.Add(3*time.Second), 73, "\r"))); code != "AA" {
		t.Fatalf("duplicate: %s", code)
	}
	if d := testutil.ToFloat64(srv.h.m.duplicates); d != 1 {
		t.Errorf("duplicates metric %v, want 1", d)
	}
	// Malformed: an OBX segment id in lower case.
	bad := strings.Replace(pcd("BAD-1", "MRN-1", "AABBCCDDEEFF0011", t0, 70, "\r"), "\rOBX|3|", "\robx|3|", 1)
	ack := c.roundTrip(bad)
	code, ctl := msa(ack)
	e := errs(ack)
	if code != "AR" || ctl != "BAD-1" || len(e) != 1 || !strings.HasPrefix(e[0], "^7|100|E|malformed_message|") {
		t.Errorf("malformed: %s %s %v", code, ctl, e)
	}
	// NM value that is not a number: AA for the others, W on OBX[2]-5.
	half := strings.Replace(pcd("HALF-1", "MRN-2", "AABBCCDDEEFF0022", t0, 70, "\r"), "|70|264864", "|7O|264864", 1)
	ack = c.roundTrip(half)
	if code, _ := msa(ack); code != "AA" || len(errs(ack)) != 1 || !strings.HasPrefix(errs(ack)[0], "OBX^2^5|102|W|invalid_type|OBX[2]-5: ") {
		t.Errorf("half: %s %v", code, errs(ack))
	}
	// An unmapped MDC code only: AR, dead letter unmapped_code.
	unm := "MSH|^~\\&|GW|ICU-EAST|||20240301101500||ORU^R01|UNM-1|P|2.6\rPID|||MRN-3^^^H^MR\r" +
		"OBX|1|NM|188999^MDC_NOT_A_CODE^MDC|1.1.1.1|5|262688^MDC_DIM_PERCENT^MDC|||||R|||" + t0.UTC().Format("20060102150405") + "\r"
	ack = c.roundTrip(unm)
	if code, _ := msa(ack); code != "AR" || len(errs(ack)) != 1 || !strings.HasPrefix(errs(ack)[0], "OBX^1^3|103|E|unmapped_code|") {
		t.Errorf("unmapped: %s %v", code, errs(ack))
	}

	// Kafka: each message's batch exactly once.
	count := map[string]int{}
	samples := 0
	for _, b := range readBatches(t, broker, cfg.Kafka.Topics.Samples) {
		count[b.MessageId]++
		samples += len(b.Samples)
		if b.Source != vigilv1.Source_SOURCE_MLLP || b.Tenant != "default" || b.Location != "bed:ICU/12/A" {
			t.Errorf("batch %v", b)
		}
	}
	for i := 0; i < n; i++ {
		if c := count[fmt.Sprintf("E2E-%d", i)]; c != 1 {
			t.Errorf("E2E-%d: %d batches, want 1", i, c)
		}
	}
	if count["HALF-1"] != 1 || count["BAD-1"] != 0 || count["UNM-1"] != 0 || samples != n*7+6 {
		t.Errorf("batches %v, %d samples, want %d", count, samples, n*7+6)
	}
	reasons := map[string][]*vigilv1.DeadLetter{}
	for _, l := range readLetters(t, broker, cfg.Kafka.Topics.DeadLetter) {
		reasons[l.Reason] = append(reasons[l.Reason], l)
	}
	if l := reasons["malformed_message"]; len(l) != 1 || !bytes.Equal(l[0].Raw, []byte(bad)) || l[0].MessageId != "BAD-1" {
		t.Errorf("malformed dead letters %v", l)
	}
	if l := reasons["unmapped_code"]; len(l) != 1 || l[0].Field != "OBX[1]-3" || !strings.Contains(l[0].Message, "188999") || l[0].MessageId != "UNM-1" {
		t.Errorf("unmapped dead letters %v", l)
	}
	if l := reasons["invalid_type"]; len(l) != 1 || l[0].Field != "OBX[2]-5" {
		t.Errorf("invalid_type dead letters %v", l)
	}

	// ClickHouse: every sample exactly once (the raw table, no FINAL).
	conn, err := chsink.Open(ctx, cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	want := uint64(n*7 + 6)
	var got uint64
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
		if err := conn.QueryRow(ctx, "SELECT count() FROM samples WHERE source = 'mllp'").Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got >= want {
			break
		}
	}
	time.Sleep(time.Second) // a duplicate insert would show now
	if err := conn.QueryRow(ctx, "SELECT count() FROM samples WHERE source = 'mllp'").Scan(&got); err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Errorf("%d rows in ClickHouse, want %d", got, want)
	}
	var hr float64
	if err := conn.QueryRow(ctx, "SELECT value FROM samples WHERE message_id = 'E2E-4' AND metric = 'heart_rate' AND source_code = 'MDC:147842'").Scan(&hr); err != nil || hr != 74 {
		t.Errorf("heart rate of E2E-4: %v %v", hr, err)
	}
}

// TestKafkaDownAnswersAE checks that when Kafka does not acknowledge, the
// sender gets AE (send again) and nothing is dead-lettered.
func TestKafkaDownAnswersAE(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	_ = ln.Close() // nothing listens there any more
	cfg := config.Default()
	cfg.Kafka.Brokers = []string{dead}
	cfg.Kafka.ProduceTimeout = time.Second
	cfg.MLLP.Listen = "127.0.0.1:0"
	srv := startServer(t, cfg, nil, Options{})
	start := time.Now()
	ack := dial(t, srv.Addr()).roundTrip(pcd("DOWN-1", "MRN-1", "DEV", time.Now(), 70, "\r"))
	if code, ctl := msa(ack); code != "AE" || ctl != "DOWN-1" {
		t.Errorf("%s %s %v, want AE", code, ctl, errs(ack))
	}
	if e := errs(ack); len(e) != 1 || !strings.Contains(e[0], "|207|E|") {
		t.Errorf("ERR %v", e)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("AE after %s", d)
	}
}

// TestManyConnectionsAndOrder runs 20 connections at once, each sending its
// messages in order, and checks that every ACK answers its own message.
func TestManyConnectionsAndOrder(t *testing.T) {
	broker := testenv.Kafka(t)
	cfg := testenv.Config(t, broker, "")
	cfg.MLLP.MaxConnections = 8 // fewer than senders: the rest wait
	srv := startServer(t, cfg, nil, Options{})
	const conns, per = 20, 10
	errc := make(chan error, conns)
	now := time.Now().Add(-time.Minute)
	for c := 0; c < conns; c++ {
		go func(c int) {
			cl, err := net.Dial("tcp", srv.Addr())
			if err != nil {
				errc <- err
				return
			}
			defer cl.Close()
			r := NewReader(cl, 1<<20)
			for i := 0; i < per; i++ {
				id := fmt.Sprintf("C%d-%d", c, i)
				at := now.Add(time.Duration(i) * time.Second) // distinct observations: none is a repeat
				if _, err := cl.Write(AppendFrame(nil, []byte(pcd(id, fmt.Sprintf("P%d", c), "DEV", at, 70, "\r")))); err != nil {
					errc <- err
					return
				}
				b, err := r.Next()
				if err != nil {
					errc <- err
					return
				}
				m, err := hl7.Parse(b)
				if err != nil {
					errc <- err
					return
				}
				if code, ctl := msa(m); code != "AA" || ctl != id {
					errc <- fmt.Errorf("%s: ack %s %s", id, code, ctl)
					return
				}
			}
			errc <- nil
		}(c)
	}
	for c := 0; c < conns; c++ {
		if err := <-errc; err != nil {
			t.Error(err)
		}
	}
	ids := map[string]bool{}
	for _, b := range readBatches(t, broker, cfg.Kafka.Topics.Samples) {
		ids[b.MessageId] = true
	}
	if len(ids) != conns*per {
		keys := make([]string, 0, len(ids))
		for k := range ids {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		t.Errorf("%d distinct messages on the topic, want %d", len(ids), conns*per)
	}
}
