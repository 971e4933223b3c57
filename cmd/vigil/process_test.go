package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"google.golang.org/protobuf/proto"

	"github.com/vigilhealth/vigil/internal/config"
	"github.com/vigilhealth/vigil/internal/testenv"
	vigilv1 "github.com/vigilhealth/vigil/proto/vigil/v1"
	chsink "github.com/vigilhealth/vigil/sinks/clickhouse"
)

// These tests run the real binary as a separate process, as a site would.

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func vigilBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "vigil-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "vigil")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// proc is a running vigil process with its combined output captured.
type proc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startVigil(t *testing.T, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(vigilBinary(t), args...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), "VIGIL_LOG_LEVEL=info", "VIGIL_MQTT_EMBEDDED_LISTEN=127.0.0.1:0") // tests that need a fixed MQTT port pass --set
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, out: out, done: make(chan error, 1)}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("vigil %s output:\n%s", args[0], out.String())
		}
	})
	return p
}

// stop sends SIGTERM and waits for a clean exit within limit.
func (p *proc) stop(t *testing.T, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		if err != nil {
			t.Fatalf("vigil exited with %v after SIGTERM", err)
		}
	case <-time.After(limit):
		t.Fatalf("vigil did not stop within %s of SIGTERM", limit)
	}
	return time.Since(start)
}

func waitHTTP(t *testing.T, url string, p *proc, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		select {
		case err := <-p.done:
			t.Fatalf("vigil exited early: %v", err)
		default:
		}
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s not ready within %s", url, limit)
}

// TestRunSimulateStopRestart runs `vigil run --simulate` as `make run` does:
// within 60 s ClickHouse must hold samples, features, NEWS2 scores and an
// alert; then SIGTERM in the middle of the simulation and a restart must lose
// no accepted sample and duplicate none. No duplicate row is tolerated, even
// before ClickHouse merges: a graceful stop drains the sink (offsets
// committed after the rows), the restarted simulator resumes after what it
// sent, and MLLP re-sends are published once. (Only a hard crash between an
// insert and its commit re-inserts rows, which collapse under FINAL; this
// test does not crash.)
func TestRunSimulateStopRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the whole platform twice (~1.5 min)")
	}
	dataDir := t.TempDir()
	kafkaPort, chTCP, chHTTP, httpPort := freePort(t), freePort(t), freePort(t), freePort(t)
	args := []string{"run", "--simulate", "--data-dir", dataDir,
		"--http", fmt.Sprintf("127.0.0.1:%d", httpPort),
		"--set", fmt.Sprintf("kafka.embedded.listen=127.0.0.1:%d", kafkaPort),
		"--set", fmt.Sprintf("clickhouse.local.tcp_port=%d", chTCP),
		"--set", fmt.Sprintf("clickhouse.local.http_port=%d", chHTTP),
		"--set", "status.interval=2s", "--set", "mllp.listen=127.0.0.1:0"}
	base := fmt.Sprintf("http://127.0.0.1:%d", httpPort)
	started := time.Now()
	p := startVigil(t, args...)
	waitHTTP(t, base+"/readyz", p, 90*time.Second)

	chCfg := config.Default().ClickHouse
	chCfg.Addr = fmt.Sprintf("127.0.0.1:%d", chTCP)
	conn, err := chsink.Open(context.Background(), chCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	// A probe client posts alongside the simulator and remembers exactly
	// which samples Vigil acknowledged.
	probe := newProbe(base)
	probeCtx, stopProbe := context.WithCancel(context.Background())
	probeDone := make(chan struct{})
	go func() { probe.run(probeCtx); close(probeDone) }()

	// Everything within 60 s of `vigil run` starting.
	deadline := started.Add(60 * time.Second)
	queries := map[string]string{
		"samples":      "SELECT count() FROM samples",
		"features":     "SELECT count() FROM features",
		"news2 scores": "SELECT count() FROM scores WHERE kind = 'news2'",
		"alerts":       "SELECT count() FROM alerts WHERE type = 'raised'",
	}
	for name, q := range queries {
		for {
			var n uint64
			if err := conn.QueryRow(context.Background(), q).Scan(&n); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
			if n > 0 {
				t.Logf("%s in clickhouse after %s", name, time.Since(started).Round(time.Second))
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s in clickhouse within 60 s of start", name)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}

	// Let the simulation run on, with its status lines, then stop it in the
	// middle.
	for i := 0; !strings.Contains(p.out.String(), "status:"); i++ {
		if i > 100 {
			t.Fatal("no status line in the output of vigil run within 10 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(5 * time.Second)
	took := p.stop(t, 20*time.Second)
	t.Logf("stopped in %s after SIGTERM", took.Round(time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("vigil run took %s to stop after SIGTERM; want a few seconds", took)
	}
	time.Sleep(500 * time.Millisecond)

	p2 := startVigil(t, args...)
	waitHTTP(t, base+"/readyz", p2, 90*time.Second)
	time.Sleep(3 * time.Second)
	stopProbe()
	<-probeDone
	accepted := probe.acceptedSeqs()
	if len(accepted) < 50 {
		t.Fatalf("probe got only %d samples accepted", len(accepted))
	}
	// Wait for the sink to catch up with every accepted probe sample.
	waitCount(t, conn, "SELECT count() FROM samples WHERE patient = 'restart-probe'", uint64(len(accepted)), 60*time.Second)
	inCH := countsBy[uint64](t, conn, "SELECT sequence, count() FROM samples WHERE patient = 'restart-probe' GROUP BY sequence")
	for _, s := range accepted {
		switch inCH[s] {
		case 1:
		case 0:
			t.Errorf("accepted probe sample seq %d lost", s)
		default:
			t.Errorf("accepted probe sample seq %d stored %d times", s, inCH[s])
		}
	}
	// No duplicate anywhere in the table, counted without FINAL.
	var total, distinct uint64
	if err := conn.QueryRow(context.Background(), `SELECT count(), uniqExact(tenant, patient, device, metric, event_time_ms, channel, sequence) FROM samples`).Scan(&total, &distinct); err != nil {
		t.Fatal(err)
	}
	if total != distinct {
		t.Errorf("samples table holds %d rows for %d distinct samples; %s", total, distinct,
			kafkaSampleDuplicates(t, fmt.Sprintf("127.0.0.1:%d", kafkaPort)))
	}
	t.Logf("probe: %d samples accepted across the restart, all present once; table: %d rows", len(accepted), total)
	// The simulator's devices came through the hospital gateways of the
	// process (simulator.gateways.auto): beds over HL7 v2/MLLP, wearables
	// over the embedded MQTT broker, spot checks over FHIR, the probe over
	// HTTP.
	bySource := countsBy[string](t, conn, "SELECT source, count() FROM samples GROUP BY source")
	t.Logf("samples by source: %v", bySource)
	for _, src := range []string{"mllp", "mqtt", "fhir", "http"} {
		if bySource[src] == 0 {
			t.Errorf("no samples from source %q in clickhouse (by source: %v)", src, bySource)
		}
	}
	if !strings.Contains(p.out.String(), "beds over HL7 v2/MLLP") {
		t.Errorf("the banner does not say the beds go over MLLP:\n%s", p.out.String())
	}
	p2.stop(t, 20*time.Second)
}

// countsBy runs q, a "SELECT key, count() ... GROUP BY key" query, and
// returns the counts by key.
func countsBy[K comparable](t *testing.T, conn driver.Conn, q string) map[K]uint64 {
	t.Helper()
	rows, err := conn.Query(context.Background(), q)
	if err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	defer rows.Close()
	counts := map[K]uint64{}
	for rows.Next() {
		var k K
		var n uint64
		if err := rows.Scan(&k, &n); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
		counts[k] = n
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	return counts
}

// kafkaSampleDuplicates reads the samples topic (read-committed) and tells
// whether it already holds the duplicates: if so they were produced twice
// (ingest or the simulator), else the sink inserted records twice.
func kafkaSampleDuplicates(t *testing.T, broker string) string {
	t.Helper()
	seen := map[string][]string{}
	n := 0
	for _, r := range testenv.ReadAll(t, broker, "vigil.samples.v1") {
		var b vigilv1.SampleBatch
		if err := proto.Unmarshal(r.Value, &b); err != nil {
			return fmt.Sprintf("samples topic record %d@%d does not decode: %v", r.Partition, r.Offset, err)
		}
		for _, s := range b.Samples {
			n++
			k := fmt.Sprintf("%s/%s/%s/%s/%d/%s/%d", b.Tenant, b.Patient, b.Device, s.Metric, s.EventTimeMs, s.Channel, s.Sequence)
			seen[k] = append(seen[k], fmt.Sprintf("%s message %s at %d@%d", b.Source.Label(), b.MessageId, r.Partition, r.Offset))
		}
	}
	example := ""
	for k, w := range seen {
		if len(w) > 1 {
			example = fmt.Sprintf(", e.g. %s: %s", k, strings.Join(w, "; "))
			break
		}
	}
	return fmt.Sprintf("topic vigil.samples.v1 holds %d samples for %d distinct ones%s", n, len(seen), example)
}

// probe posts one heart-rate sample every 10 ms and records which were
// acknowledged with 200.
type probe struct {
	base string
	mu   sync.Mutex
	ok   []uint64
}

func newProbe(base string) *probe { return &probe{base: base} }

func (p *probe) run(ctx context.Context) {
	client := &http.Client{Timeout: 5 * time.Second}
	t0 := time.Now().Add(-time.Minute).UnixMilli()
	for seq := uint64(1); ctx.Err() == nil; seq++ {
		body := fmt.Sprintf(`{"tenant":"demo","patient":"restart-probe","device":"probe-1","samples":[{"metric":"heart_rate","value":%d,"unit":"/min","time_ms":%d,"seq":%d}]}`,
			60+seq%40, t0+int64(seq)*10, seq)
		resp, err := client.Post(p.base+"/v1/samples", "application/json", strings.NewReader(body))
		if err == nil {
			if resp.StatusCode == http.StatusOK {
				p.mu.Lock()
				p.ok = append(p.ok, seq)
				p.mu.Unlock()
			}
			resp.Body.Close()
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (p *probe) acceptedSeqs() []uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]uint64(nil), p.ok...)
}

// TestBrokerListsTopicsToKcat runs `vigil broker` alone and lists its topics
// with Debian's kcat, as an operator would.
func TestBrokerListsTopicsToKcat(t *testing.T) {
	kcat, err := exec.LookPath("kcat")
	if err != nil {
		t.Fatal("kcat not installed: run `make deps`")
	}
	port := freePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	p := startVigil(t, "broker", "--data-dir", t.TempDir(), "--set", "kafka.embedded.listen="+addr)
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(p.out.String(), "topics ready") {
		if time.Now().After(deadline) {
			t.Fatal("vigil broker did not become ready")
		}
		time.Sleep(100 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, kcat, "-b", addr, "-L").CombinedOutput()
	if err != nil {
		t.Fatalf("kcat -L: %v\n%s", err, out)
	}
	for _, topic := range []string{"vigil.samples.v1", "vigil.deadletter.v1", "vigil.features.v1", "vigil.scores.v1",
		"vigil.alerts.v1", "vigil.imaging.v1", "vigil.audit.v1"} {
		if !strings.Contains(string(out), `topic "`+topic+`"`) {
			t.Errorf("kcat -L does not list %s:\n%s", topic, out)
		}
	}
	p.stop(t, 10*time.Second)
}

func (s *syncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.b.Bytes())
}

func (s *syncBuffer) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.b.Reset()
}
