package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
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
	var out, errOut bytes.Buffer
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
	code, out, errOut = vigilCLI(t, "deadletter", "redrive", "--reason", "unbound_device", "--brokers", brokerAddr)
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
	code, out, _ = vigilCLI(t, "deadletter", "redrive", "--reason", "unbound_device", "--brokers", brokerAddr)
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
