package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vigilhealth/vigil/internal/testenv"
)

// TestReplayCommand runs `vigil replay` through the CLI entry on a PSV
// folder into a real broker (topics created by the command), and checks the
// summary (per file 7 + 3 vital cells = 10 samples) and the samples topic.
func TestReplayCommand(t *testing.T) {
	dir := t.TempDir()
	psv := "HR|O2Sat|Temp|SBP|MAP|DBP|Resp|EtCO2|FiO2|ICULOS|SepsisLabel\n" +
		"80|97|37|120|90|70|16|NaN|NaN|1|0\n" +
		"82|96|NaN|NaN|NaN|NaN|18|NaN|NaN|2|0\n"
	for _, p := range []string{"p1", "p2"} {
		if err := os.WriteFile(filepath.Join(dir, p+".psv"), []byte(psv), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	addr := testenv.Kafka(t)
	var out, errOut bytes.Buffer
	code := realMain([]string{"replay", "--brokers", addr, "--data-dir", t.TempDir(), "--quiet", "--tenant", "ward-9", dir},
		nil, &out, &errOut)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	if !strings.Contains(out.String(), "replayed 2 files, 4 rows: 20 samples accepted in 4 batches, 0 refused") {
		t.Errorf("summary: %s", out.String())
	}
	recs := testenv.ReadAll(t, addr, "vigil.samples.v1")
	if len(recs) != 4 || !strings.HasPrefix(string(recs[0].Key), "ward-9/p") {
		t.Errorf("%d records on vigil.samples.v1", len(recs))
	}
	// No input is a usage mistake, reported as such.
	out.Reset()
	errOut.Reset()
	if code := realMain([]string{"replay", "--brokers", addr, "--quiet"}, nil, &out, &errOut); code == 0 ||
		!strings.Contains(errOut.String(), "name the files or folders") {
		t.Errorf("no input: exit %d, %s", code, errOut.String())
	}
}
