// Package testenv starts the real services integration tests run against: a
// ClickHouse server (Debian's clickhouse-server as a child process on free
// loopback ports, one per test binary, with a fresh database per test) and
// an embedded Kafka-protocol broker (kfake) reached over TCP (one per test).
//
// Use Main from TestMain so the shared ClickHouse is stopped at the end:
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/vigilhealth/vigil/internal/broker"
	"github.com/vigilhealth/vigil/internal/bus"
	"github.com/vigilhealth/vigil/internal/chserver"
	"github.com/vigilhealth/vigil/internal/config"
)

var (
	chOnce sync.Once
	chSrv  *chserver.Server
	chErr  error
	chDir  string
)

// Main runs the tests and stops the shared ClickHouse afterwards.
func Main(m *testing.M) {
	code := m.Run()
	if chSrv != nil {
		_ = chSrv.Close(context.Background())
	}
	if chDir != "" {
		_ = os.RemoveAll(chDir)
	}
	os.Exit(code)
}

// ClickHouse returns the address of the shared test ClickHouse server,
// starting it on first use.
func ClickHouse(t testing.TB) string {
	t.Helper()
	chOnce.Do(func() {
		chDir, chErr = os.MkdirTemp("", "vigil-test-clickhouse-")
		if chErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
		defer cancel()
		// Benchmarks run the server at the priority `vigil run` gives it
		// (clickhouse.local.nice); tests at ours, so that a loaded CI
		// machine does not starve it.
		nice := 0
		if f := flag.Lookup("test.bench"); f != nil && f.Value.String() != "" {
			nice = config.Default().ClickHouse.Local.Nice
		}
		chSrv, chErr = chserver.Start(ctx, chserver.Options{DataDir: chDir, Nice: nice})
	})
	if chErr != nil {
		t.Fatalf("starting test clickhouse: %v", chErr)
	}
	return chSrv.Addr()
}

// Database returns a fresh, unique database name for one test (not created:
// migrations create it).
func Database(t testing.TB) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return "test_" + hex.EncodeToString(b[:])
}

// Kafka starts an embedded broker on a free loopback port with its data in a
// temp dir, stopped when the test ends, and returns its address.
func Kafka(t testing.TB) string {
	t.Helper()
	b, err := broker.Start(broker.Options{
		Listen:  "127.0.0.1:0",
		DataDir: filepath.Join(t.TempDir(), "kafka"),
		Log:     slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatalf("starting test broker: %v", err)
	}
	t.Cleanup(func() { _ = b.Close(context.Background()) })
	return b.Addr()
}

// Config returns the default configuration pointed at the given broker and
// ClickHouse (either may be empty), with a temp data dir and every topic
// created on the broker.
func Config(t testing.TB, brokerAddr, chAddr string) config.Config {
	t.Helper()
	cfg := config.Default()
	cfg.DataDir = t.TempDir()
	cfg.HTTP.Listen = "127.0.0.1:0"
	cfg.MLLP.Listen = "127.0.0.1:0"
	cfg.MQTT.Embedded.Listen = "127.0.0.1:0"
	cfg.Status.Interval = 0
	if brokerAddr != "" {
		cfg.Kafka.Brokers = []string{brokerAddr}
		cfg.Kafka.Partitions = 3
		cl, err := kgo.NewClient(kgo.SeedBrokers(brokerAddr))
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := bus.EnsureTopics(ctx, cl, cfg.Kafka); err != nil {
			t.Fatalf("creating topics: %v", err)
		}
	}
	if chAddr != "" {
		cfg.ClickHouse.Addr = chAddr
		cfg.ClickHouse.Database = Database(t)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("test config invalid: %v", err)
	}
	return cfg
}

// Logger returns a logger that writes to the test log.
func Logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p[:len(p)-1]))
	return len(p), nil
}

// Consume reads every record currently on topic (read-committed) until n
// records have arrived or timeout passes, and returns them.
func Consume(t testing.TB, brokerAddr, topic string, n int, timeout time.Duration) []*kgo.Record {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokerAddr), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var out []*kgo.Record
	for len(out) < n {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			break
		}
		for _, e := range fs.Errors() {
			if e.Err != context.DeadlineExceeded {
				t.Fatalf("consuming %s: %v", topic, fmt.Errorf("partition %d: %w", e.Partition, e.Err))
			}
		}
		out = append(out, fs.Records()...)
	}
	return out
}

// ReadAll reads every committed record of topic, up to each partition's
// high watermark at the time of the call, in partition order (up to 64
// partitions). Unlike Consume it needs no expected count.
func ReadAll(t testing.TB, brokerAddr, topic string) []*kgo.Record {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokerAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ends, err := kadm.NewClient(cl).ListEndOffsets(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	want := map[int32]kgo.Offset{}
	endOf := map[int32]int64{}
	ends.Each(func(o kadm.ListedOffset) {
		if o.Offset > 0 {
			want[o.Partition] = kgo.NewOffset().AtStart()
			endOf[o.Partition] = o.Offset
		}
	})
	if len(want) == 0 {
		return nil
	}
	rc, err := kgo.NewClient(kgo.SeedBrokers(brokerAddr),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: want}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.KeepControlRecords())
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	byPart := map[int32][]*kgo.Record{}
	done := map[int32]bool{}
	for len(done) < len(want) {
		fs := rc.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("reading %s: timed out", topic)
		}
		fs.EachRecord(func(r *kgo.Record) {
			if done[r.Partition] {
				return
			}
			if !r.Attrs.IsControl() {
				byPart[r.Partition] = append(byPart[r.Partition], r)
			}
			if r.Offset >= endOf[r.Partition]-1 {
				done[r.Partition] = true
			}
		})
	}
	var out []*kgo.Record
	for p := int32(0); p < 64; p++ {
		out = append(out, byPart[p]...)
	}
	return out
}

// Dataset returns the path of a folder of the shared public data sets
// (../shared/datasets/<name>, relative to the repository root), failing the
// test when it is missing. Tests read the data sets in place; they are never
// copied into the repository.
func Dataset(t testing.TB, name string) string {
	t.Helper()
	p := filepath.Join(RepoRoot(t), "..", "shared", "datasets", name)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("data set %s: %v (the shared data sets must sit beside the repository)", name, err)
	}
	return p
}

// RepoRoot returns the repository root (the folder holding go.mod) above the
// working directory, failing the test when there is none.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatalf("finding the working directory: %v", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("finding the repository root (go.mod) above the working directory")
		}
		dir = parent
	}
}

// ONNXRuntime returns the path of the ONNX Runtime shared library that `make
// deps` fetches from npm (onnxruntime-node) into .cache/onnxruntime/current,
// failing the test with the command to run when it is missing.
func ONNXRuntime(t testing.TB) string {
	t.Helper()
	p := filepath.Join(RepoRoot(t), ".cache", "onnxruntime", "current", "libonnxruntime.so.1")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("ONNX Runtime library: %v (run `make onnxruntime`, which fetches it from npm onnxruntime-node)", err)
	}
	return p
}
