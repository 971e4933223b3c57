package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaultsValidate(t *testing.T) {
	c := Default()
	if err := c.Validate(); err != nil {
		t.Fatalf("defaults do not validate: %v", err)
	}
}

func TestLoadFileEnvAndSet(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "vigil.yaml")
	doc := "kafka:\n  brokers: [\"k1:9092\"]\nstream:\n  window: 30s\n"
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path, []string{"VIGIL_HTTP_LISTEN=127.0.0.1:9999", "VIGIL_KAFKA_BROKERS=a:1,b:2", "OTHER=x"},
		[]string{"sink.batch_rows=7", "stream.out_of_orderness=2s"})
	if err != nil {
		t.Fatal(err)
	}
	if c.HTTP.Listen != "127.0.0.1:9999" {
		t.Errorf("env override of http.listen: got %q", c.HTTP.Listen)
	}
	if strings.Join(c.Kafka.Brokers, ",") != "a:1,b:2" {
		t.Errorf("env overrides file for kafka.brokers: got %v", c.Kafka.Brokers)
	}
	if c.Stream.Window != 30*time.Second || c.Stream.OutOfOrderness != 2*time.Second || c.Sink.BatchRows != 7 {
		t.Errorf("file/flag values not applied: %+v %+v", c.Stream, c.Sink)
	}
}

func TestUnknownKeyFails(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "vigil.yaml")
	_ = os.WriteFile(path, []byte("kafka:\n  brokerz: [x]\n"), 0o600)
	_, err := Load(path, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "brokerz") {
		t.Fatalf("unknown key: got %v, want an error naming brokerz", err)
	}
}

func TestValidationNamesFields(t *testing.T) {
	_, err := Load("", nil, []string{"stream.window=1500ms", "kafka.partitions=0", "log.level=loud"})
	if err == nil {
		t.Fatal("invalid config accepted")
	}
	for _, field := range []string{"stream.window", "kafka.partitions", "log.level"} {
		if !strings.Contains(err.Error(), field) {
			t.Errorf("error %q does not name %s", err, field)
		}
	}
	if _, err := Load("", nil, []string{"no.such=1"}); err == nil || !strings.Contains(err.Error(), "no.such") {
		t.Errorf("unknown --set path: got %v", err)
	}
	if _, err := Load("", nil, []string{"sink.batch_rows=many"}); err == nil || !strings.Contains(err.Error(), "sink.batch_rows") {
		t.Errorf("bad --set value: got %v", err)
	}
}

func TestEmptyFileMeansDefaults(t *testing.T) {
	path := filepath.Join(t.TempDir(), "empty.yaml")
	_ = os.WriteFile(path, nil, 0o600)
	c, err := Load(path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.HTTP.Listen != Default().HTTP.Listen {
		t.Errorf("empty file changed defaults")
	}
}

func TestStreamValidationNamesFields(t *testing.T) {
	_, err := Load("", nil, []string{"stream.max_poll_records=0", "stream.instance_id=a b"})
	if err == nil {
		t.Fatal("invalid stream settings accepted")
	}
	for _, field := range []string{"stream.max_poll_records", "stream.instance_id"} {
		if !strings.Contains(err.Error(), field) {
			t.Errorf("error %q does not name %s", err, field)
		}
	}
	if c := Default(); c.Stream.MaxPollRecords < 1 || c.Stream.InstanceID != "" {
		t.Errorf("stream defaults: %+v", c.Stream)
	}
}

func TestSimulatorAndIngestValidationNamesFields(t *testing.T) {
	_, err := Load("", nil, []string{"simulator.target=ftp://x", "simulator.pre_roll=-1s", "simulator.request_timeout=0s",
		"simulator.retry_max=0s", "simulator.max_lag=0s", "simulator.tenant=a/b", "ingest.max_age=-1h", "ingest.backfill_age=-1h"})
	if err == nil {
		t.Fatal("invalid simulator/ingest settings accepted")
	}
	for _, field := range []string{"simulator.target", "simulator.pre_roll", "simulator.request_timeout", "simulator.retry_max",
		"simulator.max_lag", "simulator.tenant", "ingest.max_age", "ingest.backfill_age"} {
		if !strings.Contains(err.Error(), field) {
			t.Errorf("error %q does not name %s", err, field)
		}
	}
	if c := Default(); c.Simulator.PreRoll != 2*time.Minute || c.Simulator.MaxLag < c.Simulator.PreRoll {
		t.Errorf("simulator defaults: %+v", c.Simulator)
	}
}
