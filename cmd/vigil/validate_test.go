package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vigilhealth/vigil/internal/testenv"
)

// `vigil validate sepsis2019` on a few patients without a model: exit 0,
// one CSV line per input row, the figures table printed.
func TestValidateSepsisCommand(t *testing.T) {
	data := filepath.Join(testenv.Dataset(t, "sepsis2019-setB"), "training_setB.tar.gz")
	out := filepath.Join(t.TempDir(), "out", "rows.csv")
	var stdout, stderr syncBuffer
	code := realMain([]string{"validate", "sepsis2019", "--data", data, "--limit", "30", "--no-train", "--out", out,
		"--data-dir", t.TempDir(), "--log-level", "warn"}, nil, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit %d\n%s\n%s", code, stdout.String(), stderr.String())
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	if lines[0] != "patient,iculos,sepsis_label,news2,mews,qsofa,model" {
		t.Fatalf("header %q", lines[0])
	}
	// "30 patients (N septic), R rows": R data lines.
	var rows int
	for _, l := range strings.Split(stdout.String(), "\n") {
		if i := strings.Index(l, " rows; held out"); i > 0 {
			f := strings.Fields(l[:i])
			rows = atoi(f[len(f)-1])
		}
	}
	if rows == 0 || len(lines)-1 != rows {
		t.Fatalf("%d CSV lines for %d rows:\n%s", len(lines)-1, rows, stdout.String())
	}
	for _, want := range []string{"news2", "held-out 30%", "AUROC", "utility"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, stdout.String())
		}
	}
	// Usage mistakes are refused with the reason.
	for _, args := range [][]string{{"validate"}, {"validate", "sepsis2019"}, {"validate", "sepsis2019", "--data", data, "--train", "--no-train"}} {
		var o, e syncBuffer
		if code := realMain(args, nil, &o, &e); code == 0 {
			t.Errorf("%v: exit 0", args)
		}
	}
}

func atoi(s string) int {
	n := 0
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0
		}
		n = n*10 + int(c-'0')
	}
	return n
}
