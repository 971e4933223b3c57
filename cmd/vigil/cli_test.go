package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// TestPrintConfigLayers checks the precedence a site relies on: defaults,
// then the file, then VIGIL_* variables, then flags.
func TestPrintConfigLayers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vigil.yaml")
	if err := os.WriteFile(path, []byte("http:\n  listen: 127.0.0.1:7000\nstream:\n  window: 30s\nsink:\n  batch_rows: 500\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errOut syncBuffer
	code := realMain([]string{"run", "--config", path, "--http", "127.0.0.1:7001", "--set", "sink.batch_rows=700", "--print-config"},
		[]string{"VIGIL_STREAM_WINDOW=2m", "VIGIL_SINK_BATCH_ROWS=600", "VIGIL_KAFKA_BROKERS=k1:9092,k2:9092"}, &out, &errOut)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	var got struct {
		HTTP   struct{ Listen string }
		Stream struct{ Window string }
		Sink   struct {
			BatchRows int `yaml:"batch_rows"`
		}
		Kafka struct{ Brokers []string }
	}
	if err := yaml.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatalf("--print-config output is not YAML: %v\n%s", err, out.String())
	}
	if got.HTTP.Listen != "127.0.0.1:7001" || got.Stream.Window != "2m0s" || got.Sink.BatchRows != 700 ||
		strings.Join(got.Kafka.Brokers, ",") != "k1:9092,k2:9092" {
		t.Errorf("effective config: %+v", got)
	}
}

func TestConfigErrorsNameTheField(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vigil.yaml")
	_ = os.WriteFile(path, []byte("stream:\n  windw: 1m\n"), 0o600)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--config", path}, "windw"},
		{[]string{"run", "--set", "stream.window=1500ms"}, "stream.window"},
		{[]string{"stream", "--brokers", "not-a-host-port"}, "kafka.brokers[0]"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
	} {
		var out, errOut syncBuffer
		if code := realMain(tc.args, nil, &out, &errOut); code != 2 {
			t.Errorf("%v: exit %d, want 2", tc.args, code)
		}
		if !strings.Contains(errOut.String(), tc.want) {
			t.Errorf("%v: error %q does not name %q", tc.args, errOut.String(), tc.want)
		}
	}
}

func TestStageWithoutBrokersRefusesClearly(t *testing.T) {
	var out, errOut syncBuffer
	if code := realMain([]string{"stream", "--data-dir", t.TempDir()}, nil, &out, &errOut); code != 1 {
		t.Fatalf("exit %d, want 1", code)
	}
	if !strings.Contains(errOut.String(), "--brokers") {
		t.Errorf("error does not tell how to configure brokers: %s", errOut.String())
	}
}
