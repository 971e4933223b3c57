package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

// vigilCLI runs the real CLI entry point and returns its exit code and
// output.
func vigilCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut syncBuffer
	code := realMain(args, nil, &out, &errOut)
	return code, out.String(), errOut.String()
}

// TestUnboundSampleRedrivenAfterBinding is the whole story of an unbound
// wearable: its sample is refused (unbound_device) and dead-lettered; `vigil
// deadletter ls` and `show` display it; the device is bound over the
// binding API; `vigil deadletter redrive` puts the sample on the samples
// topic with its original message id and patient, and into ClickHouse
// exactly once, also when re-driven again.
func TestUnboundSampleRedrivenAfterBinding(t *testing.T) {
	testStart := time.Now()
	brokerAddr, chAddr := testenv.Kafka(t), testenv.ClickHouse(t)
	base, p := startPlatform(t, brokerAddr, chAddr, testenv.Logger(t))
	at := time.Now().Add(-time.Minute).Truncate(time.Millisecond)

	// 1. A sample naming only its device: refused, dead-lettered.
	code, body := postSamples(t, base, map[string]any{
		"tenant": "st-mary", "device": "watch-17", "message_id": "gw-9-0001",
		"samples": []map[string]any{{"metric": "heart_rate", "value": 88, "unit": "/min", "time_ms": at.UnixMilli(), "seq": 5}},
	})
	if code != http.StatusBadRequest || !strings.Contains(string(body), `"reason":"unbound_device"`) || !strings.Contains(string(body), `"field":"device"`) {
		t.Fatalf("unbound sample: %d %s, want 400 unbound_device on field device", code, body)
	}
	// Raw-only letter (not re-drivable): invalid JSON.
	resp, err := http.Post(base+"/v1/samples", "application/json", strings.NewReader(`{"tenant": "st-mary", "samples": [`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	dls := testenv.Consume(t, brokerAddr, p.cfg.Kafka.Topics.DeadLetter, 2, 20*time.Second)
	if len(dls) != 2 {
		t.Fatalf("dead letters: %d, want 2", len(dls))
	}
	var unboundID string
	for _, r := range dls {
		var dl vigilv1.DeadLetter
		if err := proto.Unmarshal(r.Value, &dl); err != nil {
			t.Fatal(err)
		}
		if dl.Reason == "unbound_device" {
			unboundID = fmt.Sprintf("%d:%d", r.Partition, r.Offset)
			if dl.Batch == nil || dl.Batch.Patient != "" || dl.Batch.Device != "watch-17" {
				t.Errorf("unbound dead letter does not carry the decoded batch without patient: %v", &dl)
			}
		}
	}
	if unboundID == "" {
		t.Fatal("no unbound_device dead letter")
	}

	// 2. ls lists both, filtered by reason, with counts by reason.
	code, out, errOut := vigilCLI(t, "deadletter", "ls", "--brokers", brokerAddr)
	if code != 0 {
		t.Fatalf("ls: exit %d: %s", code, errOut)
	}
	t.Logf("vigil deadletter ls:\n%s", out)
	for _, want := range []string{unboundID, "unbound_device", "invalid_json", "st-mary/watch-17", "raw only", "2 letters by reason:"} {
		if !strings.Contains(out, want) {
			t.Errorf("ls output lacks %q:\n%s", want, out)
		}
	}
	code, out, _ = vigilCLI(t, "deadletter", "--brokers", brokerAddr, "ls", "--reason", "unbound_device", "--since", "1h", "--json")
	var listing struct {
		Letters []struct {
			ID         string `json:"id"`
			Reason     string `json:"reason"`
			Redrivable bool   `json:"redrivable"`
		} `json:"letters"`
		Total    int            `json:"total"`
		ByReason map[string]int `json:"by_reason"`
	}
	if err := json.Unmarshal([]byte(out), &listing); code != 0 || err != nil {
		t.Fatalf("ls --json: exit %d, %v: %s", code, err, out)
	}
	if listing.Total != 1 || len(listing.Letters) != 1 || listing.Letters[0].ID != unboundID || !listing.Letters[0].Redrivable {
		t.Errorf("ls --reason unbound_device --json: %s", out)
	}
	if code, out, _ = vigilCLI(t, "deadletter", "ls", "--brokers", brokerAddr, "--until", "2h"); code != 0 || !strings.Contains(out, "0 letters") {
		t.Errorf("ls --until 2h (before anything was refused): exit %d:\n%s", code, out)
	}

	// 3. show prints the letter in full, raw JSON as text.
	code, out, errOut = vigilCLI(t, "deadletter", "show", unboundID, "--brokers", brokerAddr)
	if code != 0 {
		t.Fatalf("show: exit %d: %s", code, errOut)
	}
	t.Logf("vigil deadletter show:\n%s", out)
	for _, want := range []string{"reason:        unbound_device", "re-drivable:   yes", "raw (text):", `"metric":"heart_rate"`, "gw-9-0001"} {
		if !strings.Contains(out, want) {
			t.Errorf("show output lacks %q:\n%s", want, out)
		}
	}

	// 4. Redrive before the binding exists: refused again, a fresh letter.
	code, out, errOut = vigilCLI(t, "deadletter", "redrive", "--reason", "unbound_device", "--brokers", brokerAddr)
	if code != 0 || !strings.Contains(out, "1 refused again") {
		t.Fatalf("redrive before binding: exit %d:\n%s\n%s", code, out, errOut)
	}

	// 5. Bind the device over the API, then redrive.
	req, _ := http.NewRequest(http.MethodPut, base+"/v1/devices/watch-17/binding", strings.NewReader(fmt.Sprintf(
		`{"tenant":"st-mary","patient":"p-042","from":%q}`, at.Add(-time.Hour).Format(time.RFC3339))))
	req.Header.Set("Content-Type", "application/json")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("PUT binding: %d %s", resp.StatusCode, b)
	}
	code, out, errOut = vigilCLI(t, "deadletter", "redrive", "--reason", "unbound_device", "--dry-run", "--brokers", brokerAddr)
	if code != 0 || !strings.Contains(out, "1 would be re-driven") {
		t.Fatalf("redrive --dry-run: exit %d:\n%s\n%s", code, out, errOut)
	}
	// A time range before the refusals selects nothing.
	since, until := testStart.Add(-time.Minute).Format(time.RFC3339), time.Now().Add(time.Minute).Format(time.RFC3339)
	code, out, errOut = vigilCLI(t, "deadletter", "redrive", "--reason", "unbound_device", "--brokers", brokerAddr,
		"--since", testStart.Add(-2*time.Hour).Format(time.RFC3339), "--until", testStart.Add(-time.Hour).Format(time.RFC3339))
	if code != 0 || !strings.Contains(out, "0 letters:") {
		t.Fatalf("redrive of an earlier time range: exit %d:\n%s\n%s", code, out, errOut)
	}
	code, out, errOut = vigilCLI(t, "deadletter", "redrive", "--reason", "unbound_device", "--since", since, "--until", until,
		"--brokers", brokerAddr)
	// The original letter was tried before (step 4): skipped; the fresh
	// letter of step 4 is re-driven.
	if code != 0 || !strings.Contains(out, "1 re-driven (1 samples)") || !strings.Contains(out, "1 already re-driven") {
		t.Fatalf("redrive: exit %d:\n%s\n%s", code, out, errOut)
	}
	t.Logf("vigil deadletter redrive:\n%s", out)
	recs := testenv.Consume(t, brokerAddr, p.cfg.Kafka.Topics.Samples, 1, 20*time.Second)
	if len(recs) != 1 {
		t.Fatalf("samples topic: %d records, want 1", len(recs))
	}
	var batch vigilv1.SampleBatch
	if err := proto.Unmarshal(recs[0].Value, &batch); err != nil {
		t.Fatal(err)
	}
	if string(recs[0].Key) != "st-mary/p-042" || batch.Patient != "p-042" || batch.MessageId != "gw-9-0001" || batch.Source != vigilv1.Source_SOURCE_HTTP ||
		len(batch.Samples) != 1 || batch.Samples[0].Value != 88 || batch.Samples[0].EventTimeMs != at.UnixMilli() || batch.Samples[0].Sequence != 5 {
		t.Errorf("re-driven batch: key %s %v", recs[0].Key, &batch)
	}

	conn, err := chsink.Open(context.Background(), p.cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if n := waitCount(t, conn, "SELECT count() FROM samples WHERE patient = 'p-042'", 1, 30*time.Second); n != 1 {
		t.Fatalf("re-driven sample in clickhouse: %d rows, want 1", n)
	}

	// 6. A second redrive skips what was re-driven; --again writes it once
	// more, and ClickHouse still holds the sample once.
	code, out, _ = vigilCLI(t, "deadletter", "redrive", "--reason", "unbound_device", "--since", since, "--until", until, "--brokers", brokerAddr)
	if code != 0 || !strings.Contains(out, "0 re-driven") || !strings.Contains(out, "2 already re-driven") {
		t.Fatalf("second redrive: exit %d:\n%s", code, out)
	}
	code, out, _ = vigilCLI(t, "deadletter", "redrive", "--reason", "unbound_device", "--again", "--brokers", brokerAddr)
	if code != 0 || !strings.Contains(out, "2 re-driven (2 samples)") {
		t.Fatalf("redrive --again: exit %d:\n%s", code, out)
	}
	if n := len(testenv.Consume(t, brokerAddr, p.cfg.Kafka.Topics.Samples, 3, 20*time.Second)); n != 3 {
		t.Fatalf("samples topic after --again: %d records, want 3", n)
	}
	// Wait until the sink stored the re-sent rows, then count the sample
	// as ClickHouse serves it: once.
	waitCount(t, conn, "SELECT count() FROM samples WHERE patient = 'p-042'", 3, 10*time.Second)
	if n := waitCount(t, conn, "SELECT count() FROM samples FINAL WHERE patient = 'p-042'", 1, time.Second); n != 1 {
		t.Errorf("sample in clickhouse after three re-drives: %d (FINAL), want 1", n)
	}

	// 7. ls shows what was re-driven; the raw-only letter stays as it was.
	code, out, _ = vigilCLI(t, "deadletter", "ls", "--brokers", brokerAddr, "--reason", "unbound_device")
	if code != 0 || !strings.Contains(out, "redriven 20") || !strings.Contains(out, "2 letters") {
		t.Errorf("ls after redrive does not show it:\n%s", out)
	}
	t.Logf("vigil deadletter ls (after):\n%s", out)
	code, out, _ = vigilCLI(t, "deadletter", "redrive", "--reason", "invalid_json", "--brokers", brokerAddr)
	if code != 0 || !strings.Contains(out, "1 not re-drivable") || !strings.Contains(out, "raw only: fix the sender and resend") {
		t.Errorf("redrive of a raw-only letter: exit %d:\n%s", code, out)
	}
}

// TestBindingValidityOverHTTP: a device bound over the API to one patient
// for a bounded interval and to another from later on files each sample
// under the patient bound at the sample's event time; a sample in the gap
// between the two is dead-lettered unbound_device, and once the gap is
// bound (a retroactive PUT with from and to) `vigil deadletter redrive`
// files it under that patient. ClickHouse holds each sample once.
func TestBindingValidityOverHTTP(t *testing.T) {
	brokerAddr, chAddr := testenv.Kafka(t), testenv.ClickHouse(t)
	base, p := startPlatform(t, brokerAddr, chAddr, testenv.Logger(t))
	now := time.Now().Truncate(time.Second)
	t0, t1, t2 := now.Add(-3*time.Hour), now.Add(-2*time.Hour), now.Add(-time.Hour)
	put := func(patient string, from, to time.Time) {
		t.Helper()
		body := fmt.Sprintf(`{"tenant":"st-mary","patient":%q,"from":%q`, patient, from.Format(time.RFC3339))
		if !to.IsZero() {
			body += fmt.Sprintf(`,"to":%q`, to.Format(time.RFC3339))
		}
		req, _ := http.NewRequest(http.MethodPut, base+"/v1/devices/mon-3/binding", strings.NewReader(body+"}"))
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("PUT %s: %d %s", body, resp.StatusCode, b)
		}
	}
	put("p-a", t0, t1)          // [t0, t1)
	put("p-b", t2, time.Time{}) // [t2, open)

	sample := func(at time.Time, seq int) map[string]any {
		return map[string]any{"metric": "heart_rate", "value": 70 + seq, "unit": "/min", "time_ms": at.UnixMilli(), "seq": seq}
	}
	code, body := postSamples(t, base, map[string]any{"tenant": "st-mary", "device": "mon-3", "samples": []map[string]any{
		sample(t0.Add(30*time.Minute), 1),    // p-a
		sample(t1.Add(30*time.Minute), 2),    // in the gap
		sample(t2.Add(30*time.Minute), 3),    // p-b
		sample(t1.Add(-time.Millisecond), 4), // p-a: the end is exclusive
		sample(t1, 5),                        // the gap starts at t1
	}})
	if code != http.StatusBadRequest || !strings.Contains(string(body), `"accepted":3`) ||
		!strings.Contains(string(body), `"index":1,"field":"device","reason":"unbound_device"`) ||
		!strings.Contains(string(body), `"index":4,"field":"device","reason":"unbound_device"`) {
		t.Fatalf("post: %d %s, want 3 accepted and samples 1 and 4 refused unbound_device", code, body)
	}
	conn, err := chsink.Open(context.Background(), p.cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	query := func(patient, seqs string) string {
		return fmt.Sprintf("SELECT count() FROM samples FINAL WHERE device = 'mon-3' AND patient = '%s' AND sequence IN (%s)", patient, seqs)
	}
	if n := waitCount(t, conn, query("p-a", "1, 4"), 2, 30*time.Second); n != 2 {
		t.Errorf("p-a: %d samples in clickhouse, want sequences 1 and 4", n)
	}
	if n := waitCount(t, conn, query("p-b", "3"), 1, 10*time.Second); n != 1 {
		t.Errorf("p-b: %d samples in clickhouse, want sequence 3", n)
	}

	// Bind the gap after the fact, then re-drive: both refused samples
	// go to p-c, once.
	put("p-c", t1, t2)
	code, out, errOut := vigilCLI(t, "deadletter", "redrive", "--reason", "unbound_device", "--tenant", "st-mary", "--since", "10m",
		"--brokers", brokerAddr)
	if code != 0 || !strings.Contains(out, "2 re-driven (2 samples)") {
		t.Fatalf("redrive: exit %d:\n%s\n%s", code, out, errOut)
	}
	if n := waitCount(t, conn, query("p-c", "2, 5"), 2, 30*time.Second); n != 2 {
		t.Errorf("p-c after the redrive: %d samples in clickhouse, want sequences 2 and 5", n)
	}
	if n := waitCount(t, conn, "SELECT count() FROM samples FINAL WHERE device = 'mon-3'", 5, 5*time.Second); n != 5 {
		t.Errorf("mon-3: %d samples in clickhouse, want 5", n)
	}
}

// TestBindingsSurviveRestart runs `vigil broker` and `vigil ingest` as
// processes, binds a device over the API, stops both and starts them again
// on the same data folder: the binding is read back from the compacted
// bindings topic, served by GET and used for the next sample.
func TestBindingsSurviveRestart(t *testing.T) {
	dataDir := t.TempDir()
	brokerAddr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	httpAddr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	base := "http://" + httpAddr
	start := func() (*proc, *proc) {
		t.Helper()
		b := startVigil(t, "broker", "--data-dir", dataDir, "--set", "kafka.embedded.listen="+brokerAddr)
		deadline := time.Now().Add(30 * time.Second)
		for !strings.Contains(b.out.String(), "topics ready") {
			if time.Now().After(deadline) {
				t.Fatalf("vigil broker did not become ready:\n%s", b.out.String())
			}
			time.Sleep(100 * time.Millisecond)
		}
		in := startVigil(t, "ingest", "--brokers", brokerAddr, "--http", httpAddr)
		waitHTTP(t, base+"/readyz", in, 30*time.Second)
		return b, in
	}
	getBinding := func() (int, string) {
		t.Helper()
		resp, err := http.Get(base + "/v1/devices/bed:ICU2%2F4/binding?tenant=st-mary")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	post := func(seq int) (int, []byte) {
		return postSamples(t, base, map[string]any{"tenant": "st-mary", "device": "bed:ICU2/4", "samples": []map[string]any{
			{"metric": "spo2", "value": 96, "unit": "%", "time_ms": time.Now().Add(-time.Second).UnixMilli(), "seq": seq}}})
	}

	b, in := start()
	if code, body := getBinding(); code != http.StatusNotFound {
		t.Fatalf("GET before any binding: %d %s, want 404", code, body)
	}
	req, _ := http.NewRequest(http.MethodPut, base+"/v1/devices/bed:ICU2%2F4/binding", strings.NewReader(
		fmt.Sprintf(`{"tenant":"st-mary","patient":"p-77","from":%q,"set_by":"nurse-3"}`, time.Now().Add(-time.Hour).Format(time.RFC3339))))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("PUT: %d", resp.StatusCode)
	}
	if code, body := post(1); code != 200 {
		t.Fatalf("sample before the restart: %d %s", code, body)
	}
	in.stop(t, 20*time.Second)
	b.stop(t, 20*time.Second)

	_, _ = start()
	code, body := getBinding()
	if code != 200 || !strings.Contains(body, `"current":{"patient":"p-77"`) || !strings.Contains(body, `"set_by":"nurse-3"`) {
		t.Fatalf("GET after the restart: %d %s", code, body)
	}
	if code, body := post(2); code != 200 {
		t.Fatalf("sample after the restart: %d %s, want it filed under p-77", code, body)
	}
	recs := testenv.Consume(t, brokerAddr, "vigil.samples.v1", 2, 20*time.Second)
	if len(recs) != 2 {
		t.Fatalf("samples topic: %d records, want the two samples", len(recs))
	}
	for _, r := range recs {
		if string(r.Key) != "st-mary/p-77" {
			t.Errorf("sample keyed %q, want st-mary/p-77", r.Key)
		}
	}
}

func TestDeadletterUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"deadletter", "--brokers", "127.0.0.1:1"}, "no subcommand"},
		{[]string{"deadletter", "frob", "--brokers", "127.0.0.1:1"}, "unknown subcommand"},
		{[]string{"deadletter", "redrive", "--brokers", "127.0.0.1:1"}, "needs --reason"},
		{[]string{"deadletter", "show", "x", "--brokers", "127.0.0.1:1"}, "<partition>:<offset>"},
		{[]string{"deadletter", "ls", "--since", "last tuesday", "--brokers", "127.0.0.1:1"}, "--since"},
		{[]string{"deadletter", "ls"}, "--brokers"},
	} {
		code, _, errOut := vigilCLI(t, tc.args...)
		if code == 0 || !strings.Contains(errOut, tc.want) {
			t.Errorf("%v: exit %d, stderr %q, want it to name %q", tc.args, code, errOut, tc.want)
		}
	}
}
